"""The stage graph run for real: `dvc repro` in a temp git repo, and the Prefect flow over it."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from ladd.pipeline import load_pipeline, max_sequence_length
from tests.conftest import SMOKE_PARAMS, write_params

pytestmark = pytest.mark.slow
ALL_STAGES = {"prepare", "validate", "classifier", "teacher", "synthesize", "distill", "evaluate"}


def run(cmd, cwd):
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def init_repo(path):
    run(["git", "init", "-q"], path)
    run(["git", "-c", "user.email=ci@ladd", "-c", "user.name=ci", "commit", "-q", "--allow-empty", "-m", "init"], path)
    run([os.path.join(os.path.dirname(sys.executable), "dvc"), "init", "-q"], path)


def dvc(path, *args):
    return run([os.path.join(os.path.dirname(sys.executable), "dvc"), *args], path)


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def lock_without_timestamps(path):
    return yaml.safe_load((path / "dvc.lock").read_text())


def test_dvc_repro_noop_and_param_change(smoke_project):
    init_repo(smoke_project)
    first = dvc(smoke_project, "repro")
    assert ran_stages(first) == ALL_STAGES
    assert json.loads((smoke_project / "reports" / "metrics.json").read_text())["student"]["1"]["nfe"] == 1
    teacher = smoke_project / "models" / "teacher"
    pipe = load_pipeline(teacher)
    image = pipe("a handwritten digit five", num_inference_steps=2, guidance_scale=2.0,
                 max_sequence_length=max_sequence_length(teacher)).images[0]
    assert image.size == (32, 32)
    assert "Data and pipelines are up to date" in dvc(smoke_project, "repro")
    params = {**SMOKE_PARAMS, "teacher": {**SMOKE_PARAMS["teacher"], "steps": 12}}
    write_params(smoke_project / "params.yaml", params)
    # teacher and everything downstream of it rerun; prepare and classifier do not
    assert ran_stages(dvc(smoke_project, "repro")) == {"teacher", "synthesize", "distill", "evaluate"}


def test_prefect_flow_equals_dvc_repro(smoke_project, tmp_path_factory):
    """The flow runs dvc.yaml's stages in order and leaves the same dvc.lock as `dvc repro`."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline, stage_order

    reference = tmp_path_factory.mktemp("reference")
    for item in smoke_project.iterdir():
        run(["cp", "-r", str(item), str(reference)], smoke_project)
    init_repo(smoke_project)
    init_repo(reference)
    order = stage_order(smoke_project)
    assert order[0] == "prepare" and set(order) == ALL_STAGES
    assert order.index("validate") < order.index("teacher") < order.index("synthesize") < order.index("distill") < order.index("evaluate")
    dvc(reference, "repro")
    with prefect_test_harness(server_startup_timeout=120):
        ran = pipeline(str(smoke_project))
        assert ran == dict.fromkeys(order, True)
        assert lock_without_timestamps(smoke_project) == lock_without_timestamps(reference)
        assert pipeline(str(smoke_project)) == dict.fromkeys(order, False)
