"""The stage graph run for real: `dvc repro` in a temp git repo, and the Prefect flow over it."""

import json

import pytest
import yaml
from conftest import dvc, init_repo, run

from ladd.pipeline import load_pipeline, max_sequence_length

pytestmark = pytest.mark.slow
ALL_STAGES = {"prepare", "validate", "classifier", "teacher", "synthesize", "distill", "align", "evaluate", "export"}


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def test_prefect_flow_then_dvc(smoke_project, monkeypatch):
    """One pipeline execution through the Prefect flow, then DVC itself: the flow leaves dvc.lock exactly as
    `dvc repro` would (repro and status find nothing to do), a second flow run skips every stage, and
    `dvc exp run -S` on one parameter reruns only that stage and what depends on it."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline, stage_order

    init_repo(smoke_project)
    store = f"sqlite:///{smoke_project / 'mlflow.db'}"
    monkeypatch.setenv("LADD_TRACKING", "1")  # the real tracking path, every stage
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    order = stage_order(smoke_project)
    assert order[0] == "prepare" and set(order) == ALL_STAGES
    assert (
        order.index("validate")
        < order.index("teacher")
        < order.index("synthesize")
        < order.index("distill")
        < order.index("align")
        < order.index("evaluate")
    )
    with prefect_test_harness(server_startup_timeout=120):
        assert pipeline(str(smoke_project)) == dict.fromkeys(order, True)
        lock = (smoke_project / "dvc.lock").read_text()
        assert "Data and pipelines are up to date" in dvc(smoke_project, "repro")
        assert (smoke_project / "dvc.lock").read_text() == lock
        assert pipeline(str(smoke_project)) == dict.fromkeys(order, False)
    metrics = json.loads((smoke_project / "reports" / "metrics.json").read_text())
    assert metrics["student"]["1"]["nfe"] == 1 and metrics["teacher"]["nfe"] == 8
    # one MLflow run for the execution, each stage nested under it; the student registered as champion
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("ladd").experiment_id])
    first, noop = sorted(
        (r for r in runs if r.data.tags.get("ladd.stage") == "pipeline"), key=lambda r: r.info.start_time
    )
    assert first.info.status == noop.info.status == "FINISHED" and first.data.tags["data_fingerprint.prepare"]
    assert first.data.params["distill.steps"] == "4"

    def stages_under(run):
        return {r.data.tags["ladd.stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == run.info.run_id}

    assert stages_under(first) == ALL_STAGES and stages_under(noop) == set()
    # the Datasets panel: what distill trained on and evaluate scored, each with the hash DVC locked for it
    prepared = next(o for o in yaml.safe_load(lock)["stages"]["prepare"]["outs"] if o["path"] == "data/prepared")
    for stage, expected in (
        ("distill", {"prepared/train": "training"}),
        ("evaluate", {"prepared/train": "training", "prepared/test": "evaluation"}),
    ):
        (ran,) = [
            r
            for r in runs
            if r.data.tags.get("ladd.stage") == stage and r.data.tags.get("mlflow.parentRunId") == first.info.run_id
        ]
        inputs = client.get_run(ran.info.run_id).inputs.dataset_inputs
        assert {i.dataset.name: {t.key: t.value for t in i.tags}["mlflow.data.context"] for i in inputs} == expected
        assert {t.value for i in inputs for t in i.tags if t.key == "dvc.out.md5"} == {prepared["md5"]}
    assert str(client.get_model_version_by_alias("ladd-student", "champion").version) == "1"
    assert [str(v.version) for v in client.search_model_versions("name='ladd-student-onnx'")] == ["1"]
    assert json.loads((smoke_project / "reports" / "export.json").read_text())["max_abs_error"] <= 1e-3
    teacher = smoke_project / "models" / "teacher"
    image = load_pipeline(teacher)(
        "a handwritten digit five",
        num_inference_steps=2,
        guidance_scale=2.0,
        max_sequence_length=max_sequence_length(teacher),
    ).images[0]
    assert image.size == (32, 32)
    # experiments: commit the run, then change one stage's parameter
    run(["git", "add", "-A"], smoke_project)
    run(["git", "-c", "user.email=ci@ladd", "-c", "user.name=ci", "commit", "-q", "-m", "smoke run"], smoke_project)
    out = dvc(smoke_project, "exp", "run", "-S", "distill.lr_g=0.0002")
    # distill and everything downstream of it rerun; the stages before it do not
    assert ran_stages(out) == {"distill", "align", "evaluate", "export"}
    locked = yaml.safe_load((smoke_project / "dvc.lock").read_text())["stages"]["distill"]["params"]["params.yaml"]
    assert locked["distill"]["lr_g"] == 0.0002
