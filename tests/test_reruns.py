"""Reruns, retries and kills of the stages that register models, against a real MLflow store: a student (and its
ONNX export) is registered once whatever happens, `metrics.json` agrees with the registry, no temp folder is left;
an MLflow server that dies mid-stage costs no figure; `ladd` runs from any directory with `--params`."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import edit_params, start_mlflow_server

pytestmark = pytest.mark.slow  # child processes, each with its own imports and MLflow


def _tracked(finished_project: Path, tiny_classifier_dir: Path, root: Path) -> tuple[Path, dict]:
    """A finished project with a classifier and a small evaluation, tracked in its own SQLite store."""
    project = root / "project"
    shutil.copytree(finished_project, project)
    shutil.copytree(tiny_classifier_dir, project / "models" / "classifier")
    edit_params(
        project,
        "evaluate",
        num_samples=16,
        few_steps=[1, 4],
        gate_steps=4,
        teacher_steps=3,
        seeds=[1, 2],
        grid_size=4,
        batch_size=8,
    )
    edit_params(project, "export", batch_sizes=[1], latency_repeats=2, fp16=False)  # fp16 graphs: test_export.py
    env = {**os.environ, "LADD_TRACKING": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    return project, env


def _ladd(project: Path, stage: str, env: dict, **popen):
    return subprocess.Popen(
        [sys.executable, "-m", "ladd.cli", stage, "--threads", "1"],
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


MODELS = {"evaluate": "ladd-student", "export": "ladd-student-onnx"}


def _versions(project: Path, name: str) -> list:
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}").search_model_versions(f"name = '{name}'")


@pytest.mark.parametrize("stage", ["evaluate", "export"])
def test_killed_anywhere_then_rerun_registers_once(stage, finished_project, tiny_classifier_dir, tmp_path):
    """SIGKILL at a uniform random point of the stage (inside registration too), then the same command twice: one
    version of the model, `metrics.json` naming it, the output whole and no temp folder left."""
    reference, env = _tracked(finished_project, tiny_classifier_dir, tmp_path / "reference")
    started = time.time()
    proc = _ladd(reference, stage, env)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    duration = time.time() - started

    project, env = _tracked(finished_project, tiny_classifier_dir, tmp_path / "killed")
    seed = int(os.environ.get("LADD_FAULT_SEED", time.time_ns() % 10**6))
    delay = random.Random(seed).uniform(0, duration)
    replay = f"replay with LADD_FAULT_SEED={seed} (SIGKILL {delay:.1f} s into a {duration:.1f} s run)"
    proc = _ladd(project, stage, env)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    for _ in range(2):  # the rerun finishes what the kill left; one more finds nothing to add
        rerun = _ladd(project, stage, env)
        assert rerun.wait(timeout=600) == 0, f"{rerun.stderr.read()[-3000:]}; {replay}"
    versions = _versions(project, MODELS[stage])
    assert len(versions) == 1, f"{[(v.version, v.tags) for v in versions]}; {replay}"
    leftovers = [
        p for top in ("models", "reports") for p in (project / top).rglob(".*") if p.name.endswith((".tmp", ".old"))
    ]
    assert not leftovers, f"{leftovers}; {replay}"
    if stage == "evaluate":
        registered = json.loads((project / "reports" / "metrics.json").read_text())["registered"]
        assert registered["version"] == str(versions[0].version) and registered["promoted"], replay
        from mlflow.tracking import MlflowClient

        champion = MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_model_version_by_alias(
            MODELS[stage], "champion"
        )
        assert champion.version == versions[0].version and "promoted" in versions[0].tags, replay
    else:
        manifest = json.loads((project / "models" / "onnx" / "manifest.json").read_text())
        assert all((project / "models" / "onnx" / f).is_file() for f in manifest["models"]["fp32"].values()), replay


def test_a_server_lost_mid_evaluate_costs_no_figure(finished_project, tiny_classifier_dir, tmp_path):
    """A real `mlflow server` on 127.0.0.1, stopped while evaluate samples: one line, exit 7, and metrics.json
    holds every figure; with the server back the same command registers the student."""
    project, env = _tracked(finished_project, tiny_classifier_dir, tmp_path)
    server, uri = start_mlflow_server(tmp_path / "store")
    env = {
        **env,
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    }
    try:
        proc = _ladd(project, "evaluate", env)
        lines = []
        for line in proc.stderr:  # sampling started: the stage's run is open on the server
            lines.append(line)
            if "ladd.scoring INFO teacher_3:" in line:  # the teacher row scored
                break
        server.terminate()
        server.wait(timeout=30)
        stderr = "".join(lines) + proc.stderr.read()
        assert proc.wait(timeout=300) == 7, stderr[-3000:]
    finally:
        if server.poll() is None:
            server.kill()
    assert "Traceback" not in stderr, stderr[-3000:]
    failures = [line for line in stderr.splitlines() if line.startswith("ladd evaluate: ")]
    assert len(failures) == 1 and f"the MLflow tracking server {uri} stopped answering" in failures[0], stderr[-3000:]
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert {"1", "4"} <= set(metrics["student"]) and "registered" not in metrics


def test_ladd_runs_from_another_directory_with_params(finished_project, tmp_path, monkeypatch):
    """Paths in a params file are relative to its folder: `ladd validate --params <project>/params.yaml` from
    elsewhere reads and writes the project's files, and nothing where it was started."""
    from ladd.cli import main

    project = tmp_path / "project"
    shutil.copytree(finished_project, project)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["validate", "--no-tracking", "--params", str(project / "params.yaml")]) == 0
    assert (project / "reports" / "validation" / "data").is_dir() and not list(elsewhere.iterdir())
