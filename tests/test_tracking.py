"""Evaluation tracked in a real MLflow server on 127.0.0.1: run, metrics, artifacts, registered model,
champion alias; the gate both promoting and rejecting."""

import base64
import io
import json
import shutil
import socket
from dataclasses import replace

import pandas as pd
import pytest
from conftest import start_mlflow_server
from PIL import Image

from ladd.config import EvaluateConfig
from ladd.evaluate import evaluate
from ladd.gate import evaluations, gate_decision, protocol_id
from ladd.registry import open_registry, register_and_gate
from ladd.tracking import check_tracking_server, stage_run


def test_gate_decision():
    champion = {"fd": 100.0, "accuracy": 0.95}

    def decide(candidate, champ=champion, metric="fd", direction="lower", tolerance=0.0):
        return gate_decision(candidate, champ, metric, direction, tolerance, 0.01)

    assert decide({"fd": 120.0, "accuracy": 0.99}, None) == (True, "no champion yet")
    assert decide({"fd": 99.0, "accuracy": 0.945})[0]
    ok, reason = decide({"fd": 101.0, "accuracy": 0.99})
    assert not ok and "fd 101.000 worse than the champion's 100.000" in reason
    assert decide({"fd": 101.0, "accuracy": 0.99}, tolerance=1.5)[0]
    ok, reason = decide({"fd": 90.0, "accuracy": 0.93})
    assert not ok and "accuracy 0.930" in reason
    # higher is better for CLIP score; a champion without the gated metric is not compared
    assert decide({"clip_score": 31.0}, {"clip_score": 30.0}, "clip_score", "higher")[0]
    assert not decide({"clip_score": 29.0}, {"clip_score": 30.0}, "clip_score", "higher")[0]
    assert decide({"fd_teacher": 5.0}, {"fd": 100.0}, "fd_teacher") == (
        False,
        "the champion has no fd_teacher to compare with",
    )


def test_unreachable_server_is_reported_before_work():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connection refused
        with pytest.raises(RuntimeError, match=f"http://127.0.0.1:{port} is unreachable"):
            check_tracking_server(f"http://127.0.0.1:{port}", timeout=2)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    proc, uri = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.slow
def test_evaluate_against_real_server(
    mlflow_server, monkeypatch, prepared_data, tiny_classifier_dir, tiny_teacher_dir, tiny_student_dir, tmp_path
):
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "ladd-test")
    cfg = EvaluateConfig(
        out_dir=str(tmp_path / "reports"),
        teacher_steps=3,
        few_steps=(1, 4),
        num_samples=16,
        grid_size=8,
        device="cpu",
        model_name="ladd-student-test",
    )
    with stage_run("evaluate") as tracker:
        metrics = evaluate(cfg, prepared_data, tiny_classifier_dir, tiny_teacher_dir, tiny_student_dir, tracker)
        run_id = tracker.run.info.run_id
    pid = protocol_id(metrics["protocol"])
    assert metrics["registered"] == {
        "version": "1",
        "promoted": True,
        "champion": True,
        "reason": "no champion yet",
        "previous_champion": None,
        "gate_metric": "fd",
        "champion_rescored": None,
        "already_registered": False,
        "protocol_id": pid,
    }

    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.data.tags["ladd.stage"] == "evaluate"
    assert run.data.metrics["student/4/fd"] == pytest.approx(metrics["student"]["4"]["fd"])
    assert run.data.metrics["teacher/nfe"] == 6 and run.data.metrics["student/1/nfe"] == 1
    assert metrics["student"]["4"]["fd_std"] > 0
    assert run.data.metrics["student/4/fd_std"] == pytest.approx(metrics["student"]["4"]["fd_std"])
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"metrics.json", "quality_vs_nfe.json", "grids"} <= artifacts
    assert "grids/teacher_vs_student.png" in {a.path for a in client.list_artifacts(run_id, "grids")}
    version = client.get_model_version_by_alias("ladd-student-test", "champion")
    assert str(version.version) == "1" and version.run_id == run_id
    assert float(version.tags[f"gate/{pid}/fd"]) == pytest.approx(metrics["student"]["4"]["fd"])
    assert json.loads(version.tags[f"gate/{pid}/protocol"])["seeds"] == list(cfg.seeds)

    # the registered model generates images from prompts
    model = mlflow.pyfunc.load_model("models:/ladd-student-test@champion")
    out = model.predict(pd.DataFrame({"prompt": ["a handwritten digit two"], "steps": [2], "seed": [3]}))
    image = Image.open(io.BytesIO(base64.b64decode(out["image_png"][0])))
    assert image.size == (32, 32)

    # a rerun (or a retry) of the same student under the same protocol: the same version and decision, none added
    with stage_run("evaluate") as tracker:
        again = evaluate(cfg, prepared_data, tiny_classifier_dir, tiny_teacher_dir, tiny_student_dir, tracker)
    assert again["registered"]["version"] == "1" and again["registered"]["already_registered"]
    assert again["registered"]["promoted"] and again["registered"]["reason"] == "no champion yet"
    # the same weights under another protocol: still version 1, the champion, with a second set of figures
    other = replace(cfg, seeds=(7,), out_dir=str(tmp_path / "reports-other"))
    with stage_run("evaluate") as tracker:
        moved = evaluate(other, prepared_data, tiny_classifier_dir, tiny_teacher_dir, tiny_student_dir, tracker)
    assert moved["registered"]["version"] == "1" and moved["registered"]["champion"]
    assert not moved["registered"]["promoted"] and "own weights" in moved["registered"]["reason"]
    assert [v.version for v in client.search_model_versions("name = 'ladd-student-test'")] == ["1"]
    held = evaluations(client.get_model_version("ladd-student-test", "1").tags)
    assert {k: e["metrics"]["fd"] for k, e in held.items()} == pytest.approx(
        {pid: metrics["student"]["4"]["fd"], protocol_id(moved["protocol"]): moved["student"]["4"]["fd"]}
    )
    assert held[pid]["decision"] == "promoted" and held[protocol_id(moved["protocol"])]["decision"] == "kept"

    # the gate: a worse candidate (other weights) is tagged with the reason and the alias stays; a better one takes
    # it, each compared with the champion's figures under their protocol (no re-scoring: rescore is None)
    champion_fd = metrics["student"]["4"]["fd"]

    def candidate(name):  # the same pipeline with one more file: another weights fingerprint
        folder = tmp_path / name
        shutil.copytree(tiny_student_dir, folder)
        (folder / "transformer" / "candidate.txt").write_text(name)
        return folder

    with stage_run("evaluate") as tracker:
        registry = open_registry(tracker)
        rejected = register_and_gate(
            cfg,
            {"fd": champion_fd + 50, "accuracy": 1.0},
            "fd",
            metrics["protocol"],
            candidate("worse"),
            registry,
            rescore=None,
        )
        promoted = register_and_gate(
            cfg,
            {"fd": champion_fd - 1, "accuracy": 1.0},
            "fd",
            metrics["protocol"],
            candidate("better"),
            registry,
            rescore=None,
        )
    assert rejected["version"] == "2" and not rejected["promoted"] and rejected["previous_champion"] == "1"
    assert "worse than the champion's" in client.get_model_version("ladd-student-test", "2").tags["rejected"]
    assert promoted["version"] == "3" and promoted["promoted"]
    assert str(client.get_model_version_by_alias("ladd-student-test", "champion").version) == "3"


def test_datasets_carry_the_hash_dvc_gives_them(prepared_data, tmp_path, monkeypatch):
    """A run's MLflow datasets are the splits it used, each with the hash real DVC gives that folder (`dvc add` in a
    git repo), tagged with the hash of the whole prepared folder."""
    import yaml
    from conftest import dvc, init_repo
    from mlflow.tracking import MlflowClient

    repo = tmp_path / "repo"
    repo.mkdir()
    init_repo(repo)
    shutil.copytree(prepared_data, repo / "prepared")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    with stage_run("evaluate") as tracker:
        tracker.log_datasets(repo / "prepared", {"train": "training", "test": "evaluation"})
        run_id = tracker.run.info.run_id
    inputs = MlflowClient(store).get_run(run_id).inputs.dataset_inputs
    dvc(repo, "add", "prepared")
    whole = yaml.safe_load((repo / "prepared.dvc").read_text())["outs"][0]["md5"]
    for split in ("train", "test"):
        (found,) = [i for i in inputs if i.dataset.name == f"prepared/{split}"]
        shutil.copytree(prepared_data / split, repo / split)
        dvc(repo, "add", split)
        assert found.dataset.digest == yaml.safe_load((repo / f"{split}.dvc").read_text())["outs"][0]["md5"]
        assert {t.key: t.value for t in found.tags}["dvc.out.md5"] == whole


@pytest.mark.parametrize("delay", [0.0, 0.4])
def test_a_kill_while_the_store_is_created_leaves_no_half_made_store(tmp_path, delay):
    """SIGKILL while MLflow creates and migrates a new SQLite store (the temp file exists): the store's path is
    either absent or whole, and the next stage run opens it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    db = tmp_path / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    proc = subprocess.Popen([sys.executable, "-c", "from ladd.tracking import _mlflow; _mlflow()"], env=env)
    deadline = time.time() + 120
    while not any(tmp_path.glob(".mlflow.db.*.tmp")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL or delay > 0  # at 0 s the kill lands inside the creation
    assert not db.exists() or db.stat().st_size > 0
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from ladd.tracking import stage_run\nwith stage_run('prepare') as t:\n    t.log_metrics({'x': 1})",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
