"""Evaluation tracked in a real MLflow server on 127.0.0.1: run, metrics, artifacts, registered model,
champion alias; the gate both promoting and rejecting."""

import base64
import io
import json
import socket

import pandas as pd
import pytest
from PIL import Image

from ladd.config import EvaluateConfig
from ladd.evaluate import evaluate
from ladd.gate import gate_decision
from ladd.tracking import check_tracking_server, stage_run
from conftest import start_mlflow_server


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
    assert decide({"fd_teacher": 5.0}, {"fd": 100.0}, "fd_teacher") == (False, "the champion has no fd_teacher to compare with")


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
def test_evaluate_against_real_server(mlflow_server, monkeypatch, prepared_data, tiny_classifier_dir,
                                      tiny_teacher_dir, tiny_student_dir, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "ladd-test")
    cfg = EvaluateConfig(out_dir=str(tmp_path / "reports"), teacher_steps=3, few_steps=(1, 4), num_samples=16,
                         grid_size=8, device="cpu", model_name="ladd-student-test")
    with stage_run("evaluate") as tracker:
        metrics = evaluate(cfg, prepared_data, tiny_classifier_dir, tiny_teacher_dir, tiny_student_dir, tracker)
        run_id = tracker.run.info.run_id
    assert metrics["registered"] == {"version": "1", "promoted": True, "reason": "no champion yet", "previous_champion": None,
                                     "gate_metric": "fd", "champion_rescored": None}

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
    assert float(version.tags["gate/fd"]) == pytest.approx(metrics["student"]["4"]["fd"])
    assert json.loads(version.tags["gate/protocol"])["seeds"] == list(cfg.seeds)

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
    assert [v.version for v in client.search_model_versions("name = 'ladd-student-test'")] == ["1"]

    # the gate: a worse candidate is tagged with the reason and the alias stays; a better one takes it
    champion_fd = metrics["student"]["4"]["fd"]
    with stage_run("evaluate") as tracker:
        stored = tracker.champion("ladd-student-test")
        assert stored["version"] == "1" and stored["metrics"]["fd"] == pytest.approx(champion_fd)
        assert stored["protocol"] == metrics["protocol"]

        def register(candidate):  # stands for another student: its own identity
            promote, reason = gate_decision(candidate, tracker.champion("ladd-student-test")["metrics"], "fd", "lower", 0.0, 0.01)
            return tracker.register_student(tiny_student_dir, "ladd-student-test", {"weights": f"candidate-{candidate['fd']}"},
                                            candidate, promote, reason)

        rejected = register({"fd": champion_fd + 50, "accuracy": 1.0})
        promoted = register({"fd": champion_fd - 1, "accuracy": 1.0})
    assert rejected["version"] == "2" and not rejected["promoted"] and rejected["previous_champion"] == "1"
    assert "worse than the champion's" in client.get_model_version("ladd-student-test", "2").tags["rejected"]
    assert promoted["version"] == "3" and promoted["promoted"]
    assert str(client.get_model_version_by_alias("ladd-student-test", "champion").version) == "3"
