"""Distillation on 2 CPU processes (torchrun, gloo), started by `ladd distill` itself from params.yaml's `launch`
section: DDP and FSDP2 compute what one process computes on the whole batch, the student comes out as a plain
diffusers pipeline, and a run whose rank is SIGKILLed resumes from its last checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import edit_params
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

from ladd.checkpoint import read_checkpoint_meta

pytestmark = pytest.mark.slow  # every test starts torchrun and 2 worker processes
STEPS = 6
WEIGHTS = "ladd_raw_transformer"  # the raw student (the EMA moves too little in 6 steps to compare updates)


def _project(finished_project: Path, tmp_path: Path, name: str, nproc: int, parallel: str, **distill) -> Path:
    root = tmp_path / name
    shutil.copytree(finished_project, root)
    shutil.rmtree(root / "models" / "student")
    edit_params(
        root,
        "distill",
        **{"steps": STEPS, "checkpoint": "models/checkpoints/run.safetensors", "parallel": parallel, **distill},
    )
    edit_params(root, "launch", nproc_per_node=nproc)
    return root


def _ladd(root: Path, stage: str = "distill", **popen) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ladd.cli", stage, "--no-tracking"], cwd=root, capture_output=True, text=True, **popen
    )


def _summary(root: Path) -> dict:
    """The student's training summary with the run report beside the checkpoint (processes, resume, timings)."""
    return {
        **json.loads((root / "models" / "student" / "ladd_train_summary.json").read_text()),
        **json.loads((root / "reports" / "distill.json").read_text()),
    }


def _transformer(root: Path, sub: str = WEIGHTS) -> dict:
    """The saved student, loaded by stock diffusers."""
    return SD3Transformer2DModel.from_pretrained(root / "models" / "student" / sub).state_dict()


def _update_error(ours: dict, reference: dict, start: dict) -> float:
    """|ours - reference| / |reference - start| over every weight: how far our update is from the reference's."""
    diff = sum((ours[k].double() - reference[k].double()).pow(2).sum() for k in reference)
    update = sum((reference[k].double() - start[k].double()).pow(2).sum() for k in reference)
    return float((diff / update).sqrt())


@pytest.fixture(scope="module")
def one_process(finished_project, tmp_path_factory) -> Path:
    root = _project(finished_project, tmp_path_factory.mktemp("one"), "one", 1, "none")
    proc = _ladd(root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_compute_the_one_process_update(parallel, one_process, finished_project, tmp_path):
    """2 ranks x 2 rows = 1 rank x 4 rows: every rank draws the global batch from the shared stream and trains on
    its rows, the gradients are averaged. fp32 on the CPU; only the order of the sums differs."""
    root = _project(finished_project, tmp_path, parallel, 2, parallel)
    proc = _ladd(root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _summary(root)
    assert summary["world_size"] == 2 and summary["parallel"] == parallel and summary["steps"] == STEPS
    assert summary["trained_parameters"] == _summary(one_process)["trained_parameters"]
    assert summary["replicas"] == ("student and heads" if parallel == "ddp" else "heads") + " identical on 2 ranks"
    teacher = SD3Transformer2DModel.from_pretrained(root / "models" / "teacher" / "transformer").state_dict()
    ours, reference = _transformer(root), _transformer(one_process)
    assert ours.keys() == reference.keys()
    error = _update_error(ours, reference, teacher)
    print(f"{parallel}: update error vs one process {error:.2e}")
    assert error < 1e-3
    assert _update_error(_transformer(root, "transformer"), _transformer(one_process, "transformer"), teacher) < 1e-3
    curve = (root / "reports" / "distill_curve.csv").read_text().splitlines()
    assert len(curve) == STEPS + 1
    if parallel == "ddp":
        return
    # the student gathered from the FSDP shards is a stock diffusers pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(root / "models" / "student", text_encoder_3=None, tokenizer_3=None)
    image = pipe(
        "handwritten seven",
        num_inference_steps=1,
        guidance_scale=1.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert torch.isfinite(image).all()


def test_lora_on_two_processes_computes_the_one_process_update(finished_project, tmp_path):
    """DDP averages the adapters' gradients only (the shared base is frozen): the fused student matches one process."""
    lora = dict(student="lora", lora_rank=4, lr_g=1e-3)
    one = _project(finished_project, tmp_path, "one", 1, "none", **lora)
    two = _project(finished_project, tmp_path, "two", 2, "ddp", **lora)
    for root in (one, two):
        proc = _ladd(root)
        assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _summary(two)
    assert summary["replicas"] == "student and heads identical on 2 ranks"
    assert summary["trained_parameters"] == _summary(one)["trained_parameters"]
    teacher = SD3Transformer2DModel.from_pretrained(two / "models" / "teacher" / "transformer").state_dict()
    error = _update_error(_transformer(two), _transformer(one), teacher)
    print(f"lora ddp: update error vs one process {error:.2e}")
    assert error < 1e-3


def _workers(launcher: psutil.Process) -> list[psutil.Process]:
    return [
        p
        for p in launcher.children(recursive=True)
        if "ladd.cli" in " ".join(p.cmdline())
        and p.pid != launcher.pid
        and "torch.distributed.run" not in " ".join(p.cmdline())
    ]


@pytest.mark.parametrize("victim, parallel", [("rank", "fsdp"), ("launcher", "ddp")])
def test_killed_mid_run_then_the_same_command_resumes(victim, parallel, finished_project, tmp_path):
    """SIGKILL of one rank: torchrun stops the other and the stage fails. SIGKILL of the `ladd` launcher: torchrun
    and its workers stop with it (no orphan trains on beside the next run). Either way the last checkpoint is
    whole, and the same command resumes from it."""
    root = _project(finished_project, tmp_path, "killed", 2, parallel, steps=40, checkpoint_every=1)
    ckpt = root / "models" / "checkpoints" / ("run.dcp" if parallel == "fsdp" else "run.safetensors")  # FSDP: sharded
    launcher = subprocess.Popen(
        [sys.executable, "-m", "ladd.cli", "distill", "--no-tracking"], cwd=root, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 180
    while time.time() < deadline and launcher.poll() is None:
        if ckpt.exists() and read_checkpoint_meta(ckpt)[0] >= 2:
            break
        time.sleep(0.05)
    workers = _workers(psutil.Process(launcher.pid))
    assert launcher.poll() is None and len(workers) == 2, "the run ended before it could be killed"
    os.kill(workers[1].pid if victim == "rank" else launcher.pid, signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=120)
    gone, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, f"workers still running after the {victim} was killed"
    if victim == "rank":
        assert launcher.returncode != 0 and "ladd distill: a process under torchrun failed (torchrun exit" in stderr
    else:
        assert launcher.returncode == -signal.SIGKILL
    killed_at = read_checkpoint_meta(ckpt)[0]
    assert 2 <= killed_at < 40 and not (root / "models" / "student").exists()
    edit_params(root, "distill", steps=killed_at + 2)
    proc = _ladd(root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _summary(root)
    assert summary["resumed_from"] == killed_at and summary["world_size"] == 2
    assert all(torch.isfinite(v).all() for v in _transformer(root).values())


def test_a_checkpoint_resumes_on_another_number_of_processes(one_process, finished_project, tmp_path):
    """The checkpoint holds full state dicts and the shared random stream: written by 1 process, it resumes on 2
    (FSDP) and continues the same run as on 1."""
    runs = {}
    for name, nproc, parallel in (("one", 1, "none"), ("two", 2, "fsdp")):
        root = _project(finished_project, tmp_path, name, nproc, parallel, steps=STEPS + 2)
        shutil.copytree(one_process / "models" / "checkpoints", root / "models" / "checkpoints", dirs_exist_ok=True)
        proc = _ladd(root)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert _summary(root)["resumed_from"] == STEPS and _summary(root)["world_size"] == nproc
        runs[name] = _transformer(root)
    assert _update_error(runs["two"], runs["one"], _transformer(one_process)) < 1e-3


def test_a_sharded_checkpoint_is_written_by_every_rank_and_resumes_on_one_process(
    one_process, finished_project, tmp_path
):
    """FSDP writes no gathered state: each rank its own safetensors shards (torch.distributed.checkpoint), rank 0 the
    replicated heads, RNG and step. The folder resumes on 1 process and continues the same run as 1 process does."""
    root = _project(finished_project, tmp_path, "sharded", 2, "fsdp", steps=STEPS // 2, checkpoint_every=STEPS // 2)
    proc = _ladd(root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoints = root / "models" / "checkpoints"
    assert not (checkpoints / "run.safetensors").exists()
    files = sorted(p.name for p in (checkpoints / "run.dcp").iterdir())
    shards = [f for f in files if f.startswith("shard-")]
    assert (
        len(shards) == 2
        and "replicated.safetensors" in files
        and all(f.endswith(".safetensors") for f in files if not f.startswith("."))
    )
    assert read_checkpoint_meta(checkpoints / "run.dcp")[0] == STEPS // 2
    edit_params(root, "distill", steps=STEPS, parallel="none")
    edit_params(root, "launch", nproc_per_node=1)
    proc = _ladd(root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _summary(root)["resumed_from"] == STEPS // 2 and _summary(root)["world_size"] == 1
    teacher = SD3Transformer2DModel.from_pretrained(root / "models" / "teacher" / "transformer").state_dict()
    assert _update_error(_transformer(root), _transformer(one_process), teacher) < 1e-3


def _hashes(folder: Path) -> dict:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_synthesize_splits_shards_over_ranks_and_resumes_on_any_number(finished_project, tmp_path):
    """Each rank generates every other missing shard; the data set equals one process's byte for byte, and a
    later run on 1 process regenerates only the shards that are gone."""
    sets = {}
    for nproc in (1, 2):
        root = tmp_path / f"synth{nproc}"
        shutil.copytree(finished_project, root)
        edit_params(root, "synthesize", seed=1, steps=1, shard_size=256)
        edit_params(root, "launch", nproc_per_node=nproc)
        proc = _ladd(root, "synthesize")
        assert proc.returncode == 0, proc.stderr[-3000:]
        sets[nproc] = root
    two = sets[2] / "data" / "synthetic"
    assert _hashes(two) == _hashes(sets[1] / "data" / "synthetic") and len(list(two.glob("shard-*"))) > 2
    for shard in ("shard-00000.safetensors", "shard-00003.safetensors"):
        (two / shard).unlink()
    edit_params(sets[2], "launch", nproc_per_node=1)
    proc = _ladd(sets[2], "synthesize")
    assert proc.returncode == 0 and "2 shards to generate" in proc.stderr, proc.stderr[-3000:]
    assert _hashes(two) == _hashes(sets[1] / "data" / "synthetic")


def test_evaluate_splits_batches_over_ranks_and_scores_the_same(finished_project, tiny_classifier_dir, tmp_path):
    """Rank r samples batches r, r + 2, ...; rank 0 gathers them in order: every figure equals one process's, FD to
    float rounding (a worker has one thread, one process two: some CPUs' kernels sum in another order)."""
    metrics = {}
    for nproc in (1, 2):
        root = tmp_path / f"eval{nproc}"
        shutil.copytree(finished_project, root)
        shutil.copytree(tiny_classifier_dir, root / "models" / "classifier")
        edit_params(root, "evaluate", batch_size=8, num_samples=24, few_steps=[1, 4], out_dir="reports", register=False)
        edit_params(root, "launch", nproc_per_node=nproc)
        proc = _ladd(root, "evaluate")
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics[nproc] = json.loads((root / "reports" / "metrics.json").read_text())
    for kind in ("teacher", "student"):
        one, two = metrics[1][kind], metrics[2][kind]
        rows = [(one, two)] if kind == "teacher" else [(one[k], two[k]) for k in one]
        for a, b in rows:
            assert a["accuracy"] == b["accuracy"] and a["fd"] == pytest.approx(b["fd"], rel=1e-6)
