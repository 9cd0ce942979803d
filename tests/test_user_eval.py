"""Evaluation for a user's own teacher and prompts: a prompts-only SD3.5-shaped project through the whole flow
(classifier not applicable, fd_teacher and CLIP score from a local CLIP folder, the pipeline run carrying the
headline metrics), FID with torch-fidelity's Inception network from a local weights file, and a champion gate
that never compares figures measured under different protocols."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import ROOT, SMOKE_PARAMS, write_params
from PIL import Image
from sd3_family import T5_MAX_LENGTH, build_random_inception, build_sd35_like_teacher, build_tiny_clip

from ladd.config import FEATURES, EvaluateConfig
from ladd.data.prepare import Split, load_split, write_split
from ladd.errors import ConfigError
from ladd.evaluate import evaluate
from ladd.io import fingerprint
from ladd.params import load_params
from ladd.quality import FEATURE_EXTRACTORS
from ladd.tracking import EXPERIMENT_KIND, MODEL_TRAINING, NullTracker, stage_run

STAGES = {"prepare", "validate", "classifier", "teacher", "synthesize", "distill", "align", "evaluate", "export"}
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def test_extractor_names_are_the_registry():
    assert set(FEATURES) == set(FEATURE_EXTRACTORS)


def test_settings_a_prompts_only_project_cannot_serve_fail_at_load(tmp_path):
    prompts = tmp_path / "prompts.csv"
    pd.DataFrame({"prompt": ["a red fox", "a blue car"]}).to_csv(prompts, index=False)
    clip = build_tiny_clip(tmp_path / "clip")

    def load(**evaluate):
        params = {"prepare": {"source": "prompts", "captions": str(prompts)}, "evaluate": evaluate}
        return load_params(write_params(tmp_path / "params.yaml", params))

    with pytest.raises(ConfigError, match="evaluate.features: classifier needs labelled images"):
        load(features="classifier")
    # auto (the default): no labelled images, so the CLIP or Inception weights given, else one line naming both keys
    with pytest.raises(ConfigError) as err:
        load()
    assert "evaluate.clip_path" in str(err.value) and "evaluate.inception_path" in str(err.value)
    assert "\n" not in str(err.value) and str(prompts) in str(err.value)
    assert load(clip_path=str(clip)).evaluate.features == "auto"
    with pytest.raises(ConfigError, match="evaluate.real_images: required, but prepare.source is prompts"):
        load(features="clip", clip_path=str(clip), real_images="required")
    with pytest.raises(ConfigError, match="evaluate.gate_metric: fd is measured against real images"):
        load(features="clip", clip_path=str(clip), gate_metric="fd")
    with pytest.raises(ConfigError, match="evaluate.features: inception needs evaluate.inception_path"):
        load(features="inception")
    with pytest.raises(ConfigError, match="evaluate.seeds: prompts-only data gates on fd_teacher"):
        load(features="clip", clip_path=str(clip), seeds=[7])
    assert load(features="clip", clip_path=str(clip), seeds=[7], gate_metric="fd_teacher_same_noise")
    assert load(features="clip", clip_path=str(clip)).evaluate.gate_metric == "auto"
    params = {
        "prepare": {"source": "prompts", "captions": str(prompts)},
        "evaluate": {"features": "clip", "clip_path": str(clip)},
    }
    with pytest.raises(ConfigError, match="align.reward: classifier scores the prompted digit, and .* has no labels"):
        load_params(write_params(tmp_path / "params.yaml", {**params, "align": {"enabled": True}}))
    with pytest.raises(ConfigError, match="align.reward: clip needs align.reward_path"):
        load_params(write_params(tmp_path / "params.yaml", {**params, "align": {"enabled": True, "reward": "clip"}}))
    with pytest.raises(ConfigError, match="align.reward_path: path does not exist"):
        load_params(
            write_params(
                tmp_path / "params.yaml",
                {**params, "align": {"enabled": True, "reward": "clip", "reward_path": "missing"}},
            )
        )


@pytest.fixture(scope="module")
def few_digits(prepared_data, tmp_path_factory) -> Path:
    """24 train and 8 test records of the prepared digits: real images for FID, few enough for Inception on a CPU."""
    out = tmp_path_factory.mktemp("few") / "prepared"
    for name, n in (("train", 24), ("test", 8)):
        split = load_split(prepared_data / name)
        write_split(out / name, Split(split.captions.iloc[:n].reset_index(drop=True), split.images[:n]))
    return out


@pytest.mark.slow
def test_fid_with_the_libraries_inception_from_a_local_file(few_digits, tiny_teacher_dir, tiny_student_dir, tmp_path):
    weights = build_random_inception(tmp_path / "inception.safetensors")
    cfg = EvaluateConfig(
        out_dir=str(tmp_path / "reports"),
        teacher_steps=2,
        few_steps=(1,),
        seeds=(1, 2),
        grid_size=8,
        device="cpu",
        features="inception",
        inception_path=str(weights),
        register=False,
    )
    metrics = evaluate(cfg, few_digits, "no-classifier-needed", tiny_teacher_dir, tiny_student_dir, NullTracker())
    for row in (metrics["student"]["1"], metrics["teacher_naive"]["1"]):
        assert {"fd", "fd_std", "fd_teacher", "fd_teacher_std", "precision", "recall"} <= set(row)
        assert "accuracy" not in row  # Inception does not classify digits
    assert metrics["real_floor"]["fd"] >= 0 and "fd" in metrics["teacher"]
    assert metrics["protocol"]["features_weights"] == fingerprint(weights)


@pytest.mark.slow
def test_the_gate_never_compares_figures_from_different_protocols(
    prepared_data, tiny_classifier_dir, tiny_teacher_dir, tiny_student_dir, tmp_path, monkeypatch
):
    """A champion evaluated with 2 seeds; a candidate (other weights' fingerprint) with 1 other seed: the champion
    is re-scored under the candidate's protocol (its own figure on that seed, not its stored 2-seed mean), and
    those figures stay on its version; with gate_rescore off, a candidate under a third protocol is refused with
    the reason."""
    from mlflow.tracking import MlflowClient

    from ladd.gate import evaluations

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "ladd-gate")

    def candidate(name):  # the same weights in another folder with one more file: registered as another student
        folder = tmp_path / name
        shutil.copytree(tiny_student_dir, folder)
        (folder / "transformer" / "candidate.txt").write_text(name)
        return folder

    def run(seeds, student=tiny_student_dir, **kw):
        cfg = EvaluateConfig(
            out_dir=str(tmp_path / f"reports{seeds}"),
            teacher_steps=2,
            few_steps=(4,),
            num_samples=8,
            grid_size=4,
            device="cpu",
            seeds=seeds,
            model_name="gate-test",
            **kw,
        )
        with stage_run("evaluate") as tracker:
            return evaluate(cfg, prepared_data, tiny_classifier_dir, tiny_teacher_dir, student, tracker)

    first = run((1, 2))
    assert first["registered"]["promoted"] and first["registered"]["champion_rescored"] is None
    second = run((3,), candidate("second"))  # the same weights as the champion, evaluated on another seed
    rescored = second["registered"]["champion_rescored"]
    assert rescored is not None and "re-scored under this protocol" in second["registered"]["reason"]
    assert rescored["fd"] == pytest.approx(second["student"]["4"]["fd"])  # measured now, under seed 3
    assert rescored["fd"] != pytest.approx(first["student"]["4"]["fd"])  # not the stored 2-seed figure
    assert second["registered"]["promoted"] and second["registered"]["version"] == "2"  # no worse
    client = MlflowClient(store)
    held = evaluations(client.get_model_version("gate-test", "1").tags)  # the re-scored figures stay on version 1
    assert held[second["registered"]["protocol_id"]]["metrics"]["fd"] == pytest.approx(rescored["fd"])
    assert held[first["registered"]["protocol_id"]]["metrics"]["fd"] == pytest.approx(first["student"]["4"]["fd"])
    third = run((5,), candidate("third"), gate_rescore=False)
    assert not third["registered"]["promoted"]
    reason = client.get_model_version("gate-test", third["registered"]["version"]).tags["rejected"]
    assert "another protocol" in reason and "seeds: [3] -> [5]" in reason
    assert str(client.get_model_version_by_alias("gate-test", "champion").version) == "2"


def _prompts_only_project(root: Path) -> Path:
    """A user's project: their SD3.5-shaped teacher folder and a local CLIP beside it, a 160-row prompt table,
    two non-square buckets, and the pipeline files."""
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(ROOT / ".dvcignore", root / ".dvcignore")
    shutil.copytree(ROOT / "ladd", root / "ladd", ignore=shutil.ignore_patterns("__pycache__"))
    build_sd35_like_teacher(root / "external" / "sd35")
    build_tiny_clip(root / "external" / "clip")
    prompts = [f"a {c} drawing of the digit {w}" for c in ("red", "blue", "green", "black") for w in WORDS] * 4
    pd.DataFrame({"prompt": prompts}).to_csv(root / "prompts.csv", index=False)
    params = json.loads(json.dumps(SMOKE_PARAMS))
    params["prepare"].update(source="prompts", captions="prompts.csv")
    params["validate"].update(classes=0)
    params["teacher"].update(pretrained="external/sd35", max_sequence_length=T5_MAX_LENGTH)
    params["synthesize"].update(resolutions=[[64, 128], [128, 64]], trajectory_times=[0.5, 0.25], steps=3)
    params["distill"].update(
        student_times=[1.0, 0.5, 0.25],
        schedule="exponential",
        probs=[0.5, 0.25, 0.25],
        warmup_probs=[0.0, 0.5, 0.5],
        adversarial_time_weights=[1.0, 0.0, 0.0],
    )
    params["evaluate"].update(
        features="clip",
        clip_path="external/clip",
        resolution=[64, 128],
        teacher_steps=3,
        few_steps=[1, 3],
        num_samples=0,
        seeds=[1, 2],
        gate_steps=3,
        grid_size=8,
    )
    params["export"].update(steps=3, fp16=False, batch_sizes=[1, 2], latency_repeats=1)
    # the preference stage on, with the user's CLIP as its reward
    params["align"].update(
        enabled=True,
        reward="clip",
        reward_path="external/clip",
        samples=2,
        steps=3,
        min_margin=0.0,
        min_pairs=2,
        lora_rank=4,
        train_steps=2,
        batch_size=2,
        probe_prompts=4,
        probe_every=1,
    )
    write_params(root / "params.yaml", params)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "-c", "user.email=ci@ladd", "-c", "user.name=ci", "commit", "-q", "--allow-empty", "-m", "init"],
        [_bin("dvc"), "init", "-q"],
    ):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    return root


def _bin(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


@pytest.mark.slow
def test_a_prompts_only_project_with_its_own_teacher_runs_every_stage(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline

    root = _prompts_only_project(tmp_path)
    store = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("LADD_TRACKING", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    with prefect_test_harness(server_startup_timeout=120):
        assert pipeline(str(root)) == dict.fromkeys(_order(root), True)
    status = subprocess.run([_bin("dvc"), "status"], cwd=root, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout
    # the classifier stage says why it does not apply, in its (DVC-tracked) output
    assert json.loads((root / "models/classifier/not_applicable.json").read_text())["status"] == "not applicable"
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert "real_floor" not in metrics and metrics["features"] == "clip"
    for k in ("1", "3"):
        row = metrics["student"][k]
        assert {"fd_teacher", "fd_teacher_std", "clip_score", "clip_score_std"} <= set(row) and "fd" not in row
        assert len(row["per_seed"]) == 2
    assert metrics["teacher"]["fd_teacher"] > 0  # the teacher against its samples of the other seed: the floor
    assert metrics["registered"]["gate_metric"] == "fd_teacher" and metrics["registered"]["promoted"]
    # the preference stage: CLIP-rewarded pairs of the student's samples, a DPO-LoRA, scored and gated as the result
    align = json.loads((root / "reports/align.json").read_text())
    assert align["reward"] == "clip" and set(align["before"]) == set(align["after"]) == {"1", "3"}
    assert all({"reward", "reward_std", "fd_teacher", "clip_score"} <= set(align["after"][k]) for k in ("1", "3"))
    assert metrics["aligned"]["3"]["reward"] == align["after"]["3"]["reward"]
    assert (root / "models/aligned/pytorch_lora_weights.safetensors").is_file()
    assert json.loads((root / "reports/validation/align/align_pairs.json").read_text())["success"]
    registered = MlflowClient(store).get_model_version("ladd-student", metrics["registered"]["version"])
    assert registered.tags["weights"] == fingerprint(
        root / "models/aligned/transformer", root / "models/aligned/scheduler"
    )
    pid = metrics["registered"]["protocol_id"]
    assert float(registered.tags[f"gate/{pid}/fd_teacher"]) == metrics["aligned"]["3"]["fd_teacher"]
    plot_rows = json.loads((root / "reports/quality_vs_nfe.json").read_text())["rows"]
    assert all("fd_teacher" in r for r in plot_rows if r["model"] in ("student", "teacher_naive"))
    grid = Image.open(root / "reports/grids/teacher_vs_student.png")
    assert grid.height > 5 * (64 + 2) * 3  # teacher + 2 student + 2 aligned rows at 64 px, and the prompts under them
    # MLflow: the pipeline run carries the evaluate run's metrics (Compare works on pipeline runs), the experiment
    # opens in the model-training view
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("ladd")
    assert experiment.tags[EXPERIMENT_KIND] == MODEL_TRAINING
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("ladd.stage") == "pipeline")
    evaluate_run = next(r for r in runs if r.data.tags.get("ladd.stage") == "evaluate")
    assert evaluate_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    align_run = next(r for r in runs if r.data.tags.get("ladd.stage") == "align")
    assert evaluate_run.data.metrics.items() <= parent.data.metrics.items()  # and align's summary beside them
    assert parent.data.metrics["align/pairs"] == align_run.data.metrics["align/pairs"] >= 2
    assert parent.data.metrics["student/3/fd_teacher"] == pytest.approx(metrics["student"]["3"]["fd_teacher"])
    assert {"grids", "metrics.json"} <= {a.path for a in client.list_artifacts(evaluate_run.info.run_id)}
    locked = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(locked) == STAGES
    # the Datasets panel names the prompts-only splits; the registered (aligned, T5) student answers a prompt alone
    inputs = client.get_run(evaluate_run.info.run_id).inputs.dataset_inputs
    assert {i.dataset.name for i in inputs} == {"prepared/train", "prepared/test"}
    import mlflow

    answer = mlflow.pyfunc.load_model("models:/ladd-student@champion").predict(
        pd.DataFrame({"prompt": ["a red circle"]})
    )
    default_steps = json.loads((root / "models/aligned/ladd.json").read_text())["default_steps"]
    assert (
        answer["steps"][0] == default_steps
        and Image.open(io.BytesIO(base64.b64decode(answer["image_png"][0]))).width > 0
    )
    # the single files: the aligned student's transformer and its DPO adapter, with what the adapter goes on
    settings = json.loads((root / "models/single_file/scheduler.json").read_text())
    assert (root / "models/single_file/lora_sd3.safetensors").is_file() and "aligned from" in settings["lora_base"]


def _order(root: Path) -> list[str]:
    from flows.pipeline import stage_order

    return stage_order(root)
