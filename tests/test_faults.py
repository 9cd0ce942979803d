"""Planted faults: each gives one clear error naming its culprit and changes nothing, or a documented
recovery that loses nothing valid. (The start of the fault-injection suite of the robustness issue.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ladd.config import ConfigError, DistillConfig, PrepareConfig
from ladd.data.prepare import load_split, prepare
from ladd.data.validation import ValidationFailed
from ladd.distill import distill
from ladd.io import atomic_dir, atomic_file, fingerprint
from ladd.synthesize import synthesize
from ladd.tracking import NullTracker
from conftest import write_params

DISTILL = dict(steps=4, batch_size=4, warmup_steps=2, checkpoint_every=2, log_every=1, device="cpu")


@pytest.fixture
def finished_run(tiny_teacher_dir, tiny_synthetic, tmp_path):
    """A finished 4-step distillation with its checkpoint, on a private copy of the synthetic data."""
    synthetic = tmp_path / "synthetic"
    shutil.copytree(tiny_synthetic.out_dir, synthetic)
    cfg = DistillConfig(out_dir=str(tmp_path / "student"), checkpoint=str(tmp_path / "ck" / "distill.safetensors"),
                        **DISTILL)
    distill(cfg, tiny_teacher_dir, synthetic, NullTracker())
    return cfg, synthetic


def _plant_nan(cfg, synthetic):
    shard = synthetic / "shard-00001.safetensors"
    tensors = load_file(shard)
    tensors["latents"][3, 0, 2, 2] = float("nan")
    save_file(tensors, shard, metadata={"run": "planted"})
    record = pd.read_parquet(synthetic / "records.parquet").query("shard == 1 and row == 3").iloc[0]
    return cfg, rf"1 synthetic latents are not finite, e.g. records {record['id']}#0 \(shard-00001\)"


def _lower_steps(cfg, synthetic):
    return replace(cfg, steps=2), r"distill.steps is 2 but .*distill.safetensors is at step 4"


@pytest.mark.parametrize("plant", [_plant_nan, _lower_steps], ids=["nan_latent", "steps_below_checkpoint"])
def test_distill_faults_fail_clearly_and_change_nothing(plant, finished_run, tiny_teacher_dir):
    cfg, synthetic = finished_run
    cfg, message = plant(cfg, synthetic)
    before = fingerprint(cfg.out_dir), fingerprint(Path(cfg.checkpoint).parent)
    with pytest.raises((ConfigError, ValidationFailed), match=message):
        distill(cfg, tiny_teacher_dir, synthetic, NullTracker())
    assert (fingerprint(cfg.out_dir), fingerprint(Path(cfg.checkpoint).parent)) == before


def test_unreadable_checkpoint_is_moved_aside_and_training_restarts(finished_run, tiny_teacher_dir, caplog):
    cfg, synthetic = finished_run
    path = Path(cfg.checkpoint)
    path.write_bytes(path.read_bytes()[:1000])  # torn
    torn = path.read_bytes()
    summary = distill(cfg, tiny_teacher_dir, synthetic, NullTracker())
    assert summary["resumed_from"] == 0 and summary["steps"] == 4
    assert Path(f"{path}.corrupt").read_bytes() == torn  # kept for inspection, not deleted
    assert f"checkpoint {path} is unreadable" in caplog.text and "moved to" in caplog.text


def test_a_synthesize_rerun_with_nothing_to_do_keeps_the_checkpoint(finished_run, tiny_teacher_dir, tiny_synthetic,
                                                                     prepared_data):
    """What identifies the data is its content: rerunning a finished synthesize leaves the manifest's bytes, so
    distill resumes instead of starting over."""
    cfg, synthetic = finished_run
    manifest = (synthetic / "manifest.json").read_bytes()
    assert synthesize(replace(tiny_synthetic, out_dir=str(synthetic)), prepared_data, tiny_teacher_dir,
                      NullTracker())["generated_shards"] == 0
    assert (synthetic / "manifest.json").read_bytes() == manifest
    assert distill(replace(cfg, steps=6), tiny_teacher_dir, synthetic, NullTracker())["resumed_from"] == 4


def test_16_bit_greyscale_pngs_keep_their_values(tmp_path):
    """PIL's convert("RGB") clips 16-bit values at 255 (a white image); prepare scales them to 8 bits."""
    ramp = np.arange(32 * 32, dtype=np.float64).reshape(32, 32) / (32 * 32 - 1)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.round(ramp * 65535).astype(np.uint16)).save(images / "deep.png")
    pd.DataFrame({"file": ["deep.png"] * 10, "caption": ["a ramp"] * 10}).to_csv(tmp_path / "captions.csv")
    out = tmp_path / "prepared"
    prepare(PrepareConfig(source="folder", images_dir=str(images), captions=str(tmp_path / "captions.csv"),
                          resolution=32, out_dir=str(out)))
    x = load_split(out / "train").images[0].float()  # [C, 32, 32] uint8 values
    assert (x - torch.from_numpy(np.round(ramp * 255))).abs().max() <= 1


def test_outputs_get_the_users_umask_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "a.json") as tmp:
            tmp.write_text("{}")
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755


def test_cli_gives_one_line_and_a_code_per_failure_kind(tmp_path):
    """A teacher folder that is not an SD3 pipeline: exit 5 and one line naming it; --debug shows the traceback."""

    bad = tmp_path / "unet_pipeline"
    bad.mkdir()
    (bad / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    params = write_params(tmp_path / "params.yaml", {"teacher": {"pretrained": str(bad), "out_dir": str(tmp_path / "t")}})
    cmd = [sys.executable, "-m", "ladd.cli", "teacher", "--params", str(params), "--no-tracking"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 5, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ladd teacher:")]
    assert lines == [f"ladd teacher: {bad} holds a StableDiffusionPipeline, not an SD3-family pipeline "
                     "(model_index.json must name StableDiffusion3Pipeline)"]
    assert "Traceback" not in proc.stderr and not (tmp_path / "t").exists()
    debug = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, cwd=tmp_path)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "TeacherError" in debug.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_image(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(10):
        Image.fromarray(np.full((32, 32), 128, np.uint8)).save(images / f"{i}.png")
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(images / "3.png")
    pd.DataFrame({"file": [f"{i}.png" for i in range(10)], "caption": ["grey"] * 10}).to_csv(tmp_path / "c.csv", index=False)
    params = {"prepare": {"source": "folder", "images_dir": str(images), "captions": str(tmp_path / "c.csv"),
                          "out_dir": str(tmp_path / "out")}}
    return params, {}, 3, r"c.csv row 3 \(id .*\): cannot read image .*3.png: it is 1x1, under a quarter of prepare.resolution \(32\)"


def _unreachable_tracking(tmp_path):
    port = _free_port()
    params = {"prepare": {"out_dir": str(tmp_path / "out")}}
    env = {"LADD_TRACKING": "1", "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    return params, env, 7, rf"MLflow tracking server http://127.0.0.1:{port} is unreachable"


@pytest.mark.parametrize("plant", [_tiny_image, _unreachable_tracking], ids=["1x1_image", "tracking_server_down"])
def test_prepare_faults_exit_with_their_code_and_write_nothing(plant, tmp_path):

    params, env, code, message = plant(tmp_path)
    path = write_params(tmp_path / "params.yaml", params)
    proc = subprocess.run([sys.executable, "-m", "ladd.cli", "prepare", "--params", str(path)], capture_output=True,
                          text=True, cwd=tmp_path, env={**os.environ, **env})
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert re.search(message, proc.stderr), proc.stderr
    assert not (tmp_path / "out").exists()


def test_sigint_mid_synthesize_keeps_finished_shards_and_resumes(tiny_teacher_dir, prepared_data, tmp_path):
    """Ctrl-C during synthesize: exit 130 with one line; the rerun generates only the missing shards and the
    result equals an uninterrupted run's."""
    from ladd.config import SynthesizeConfig

    out = tmp_path / "synthetic"
    settings = {"out_dir": str(out), "steps": 3, "samples_per_prompt": 1, "shard_size": 128, "batch_size": 128,
                "device": "cpu"}
    params = write_params(tmp_path / "params.yaml", {"prepare": {"out_dir": str(prepared_data)},
                                                     "teacher": {"out_dir": str(tiny_teacher_dir)},
                                                     "synthesize": settings,
                                                     "validate": {"report_dir": str(tmp_path / "reports")}})
    cmd = [sys.executable, "-m", "ladd.cli", "synthesize", "--params", str(params), "--no-tracking", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (out / "shard-00001.safetensors").exists():
        time.sleep(0.02)
    assert proc.poll() is None, "synthesize ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "ladd synthesize: interrupted; finished work" in stderr and "Traceback" not in stderr
    kept = sorted(p.name for p in out.glob("shard-*.safetensors"))
    assert kept and not (out / "manifest.json").exists()
    summary = synthesize(SynthesizeConfig(**settings), prepared_data, tiny_teacher_dir, NullTracker())
    assert summary["generated_shards"] == summary["shards"] - len(kept)
    whole = tmp_path / "whole"
    synthesize(SynthesizeConfig(**{**settings, "out_dir": str(whole)}), prepared_data, tiny_teacher_dir, NullTracker())
    for shard in sorted(whole.glob("shard-*.safetensors")):
        a, b = load_file(shard), load_file(out / shard.name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def _limit_file_size(limit: int):
    """In the child: writes past `limit` bytes fail with EFBIG (Python ignores SIGXFSZ), as on a full disk."""
    import resource

    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return set_limit


def test_a_full_disk_mid_synthesize_keeps_the_previous_output(tiny_teacher_dir, tiny_synthetic, prepared_data, tmp_path):
    """A shard write that fails (a file size limit standing in for a full disk) while resuming: exit 8, one line
    naming the error, no torn shard, every finished shard and the manifest untouched."""
    out = tmp_path / "synthetic"
    shutil.copytree(tiny_synthetic.out_dir, out)
    (out / "shard-00001.safetensors").unlink()  # the one left to generate
    before = fingerprint(out)
    settings = {k: getattr(tiny_synthetic, k) for k in ("steps", "samples_per_prompt", "shard_size", "batch_size")}
    params = write_params(tmp_path / "params.yaml", {
        "prepare": {"out_dir": str(prepared_data)}, "teacher": {"out_dir": str(tiny_teacher_dir)},
        "synthesize": {**settings, "out_dir": str(out), "device": "cpu"}})
    proc = subprocess.run([sys.executable, "-m", "ladd.cli", "synthesize", "--params", str(params), "--no-tracking"],
                          capture_output=True, text=True, preexec_fn=_limit_file_size(200_000))
    assert proc.returncode == 8, proc.stderr
    assert "File too large" in proc.stderr and "Traceback" not in proc.stderr
    assert fingerprint(out) == before and not list(out.glob(".*.tmp"))


def test_sigint_mid_distill_keeps_the_checkpoint_and_resumes(tiny_teacher_dir, tiny_synthetic, tmp_path):
    from ladd.checkpoint import read_checkpoint_meta

    ckpt = tmp_path / "ck.safetensors"
    params = write_params(tmp_path / "params.yaml", {
        "teacher": {"out_dir": str(tiny_teacher_dir)}, "synthesize": {"out_dir": tiny_synthetic.out_dir},
        "distill": {**DISTILL, "steps": 400, "out_dir": str(tmp_path / "student"), "checkpoint": str(ckpt)}})
    cmd = [sys.executable, "-m", "ladd.cli", "distill", "--params", str(params), "--no-tracking", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not ckpt.exists():
        time.sleep(0.02)
    assert proc.poll() is None, "distill ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "ladd distill: interrupted; finished work" in stderr, stderr
    step = read_checkpoint_meta(ckpt)[0]
    assert step >= 2 and not (tmp_path / "student").exists()
    cfg = DistillConfig(out_dir=str(tmp_path / "student"), checkpoint=str(ckpt), **{**DISTILL, "steps": step + 2})
    assert distill(cfg, tiny_teacher_dir, tiny_synthetic.out_dir, NullTracker())["resumed_from"] == step
