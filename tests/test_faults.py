"""Fault injection. Each row of FAULTS plants one fault in a finished tiny project (data/, models/, params.yaml)
and runs one `ladd` stage on it as a user would. The stage must exit with the fault's code and one line naming
the culprit, with no traceback, and leave data/ and models/ byte for byte as they were, or, for the faults
whose right answer is to go on, make the documented recovery. Interruptions (SIGINT, SIGKILL) land at a random
point of synthesize and distill; the same command then finishes with the uninterrupted run's result."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CHECKPOINT, DISTILL, ROOT, RUN_REPORT, edit_params
from PIL import Image
from safetensors.torch import load_file, save_file
from sd3_family import build_tiny_clip

from flows.pipeline import _pipeline
from ladd.checkpoint import read_checkpoint_meta
from ladd.config import PrepareConfig
from ladd.data.prepare import load_split, prepare
from ladd.errors import ConfigError
from ladd.io import atomic_dir, atomic_file


@pytest.fixture
def project(finished_project, tmp_path) -> Path:
    root = tmp_path / "project"
    shutil.copytree(finished_project, root)
    return root


def outputs(project: Path) -> dict:
    """sha256 of every file under data/ and models/ by relative path, but for `<out>.next/` folders (the work
    of an unfinished synthesize, kept there by design so the same command resumes) and the `.lock` files that
    a run holds while it writes an output (they hold its pid)."""
    files = [p for top in ("data", "models") for p in sorted((project / top).rglob("*")) if p.is_file()]
    return {
        p.relative_to(project).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in files
        if p.suffix != ".lock" and not any(part.endswith(".next") for part in p.relative_to(project).parts)
    }


def ladd_cmd(stage: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ladd.cli", stage, "--no-tracking", "--threads", "1", *extra]


def _limit_file_size(limit: int):
    """In the child: writes past `limit` bytes fail with EFBIG (Python ignores SIGXFSZ), as on a full disk."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- planting functions: each changes the project (or returns the environment of the run) -------------------------


def _images_folder(project: Path, last: str, content: np.ndarray | bytes | None, column: str = "file") -> None:
    """An image folder and captions table of 10 rows: nine grey 32x32 PNGs, then `last` holding `content`
    (None: no such file)."""
    images = project / "incoming"
    images.mkdir()
    for i in range(9):
        Image.fromarray(np.full((32, 32), 128, np.uint8)).save(images / f"{i}.png")
    if isinstance(content, bytes):
        (images / last).write_bytes(content)
    elif content is not None:
        Image.fromarray(content).save(images / last)
    pd.DataFrame({column: [f"{i}.png" for i in range(9)] + [last], "caption": ["grey"] * 10, "label": [0] * 10}).to_csv(
        project / "captions.csv", index=False
    )  # labelled: the digit classifier still applies
    edit_params(project, "prepare", source="folder", images_dir="incoming", captions="captions.csv")


def _prompts_without_prompt_column(project: Path) -> None:
    pd.DataFrame({"text": ["a handwritten seven"]}).to_csv(project / "prompts.csv", index=False)
    _edit(
        project,
        prepare={"source": "prompts", "captions": "prompts.csv"},
        evaluate={"features": "clip", "clip_path": _clip_folder(project)},
    )  # prompts only: no classifier


def _offline_hub_id(project: Path) -> dict:
    edit_params(project, "teacher", pretrained="someone/no-such-model")
    return {"HF_HUB_OFFLINE": "1"}


def _unreachable_tracking(project: Path) -> dict:
    return {"LADD_TRACKING": "1", "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_free_port()}"}


def _new_settings_failing_their_suite(project: Path) -> None:
    edit_params(project, "synthesize", guidance=1.5)
    edit_params(project, "validate", latent_tolerance=1e-6)


def _edit_captions(project: Path, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    path = project / "data" / "prepared" / "train" / "captions.parquet"
    edit(pd.read_parquet(path)).to_parquet(path)


def _set_prompts(rows: dict[int, str]):
    def edit(frame):
        for i, prompt in rows.items():
            frame.loc[i, "prompt"] = prompt
        return frame

    return edit


def _teacher_variant(project: Path, change: Callable[[Path], None]) -> None:
    folder = project / "elsewhere" / "sd3"
    shutil.copytree(project / "models" / "teacher", folder)
    change(folder)
    edit_params(project, "teacher", pretrained=str(folder))


def _pipeline_class(folder: Path, name: str) -> None:
    index = folder / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": name}))


def _shard(project: Path, k: int) -> Path:
    return project / "data" / "synthetic" / f"shard-{k:05d}.safetensors"


def _next_read(project: Path, position: int = DISTILL["steps"]) -> tuple[int, int]:
    """(shard, row) of the first record of batch `position` (by default the one distill reads once it resumes from
    the project's checkpoint at step 4): the synthetic data is checked as it is read, so the faults below sit
    where the next batch reads."""
    from ladd.data.batches import BucketBatches

    table = pd.read_parquet(project / "data" / "synthetic" / "records.parquet", columns=["bucket", "shard", "row"])
    buckets = [np.flatnonzero(table["bucket"].to_numpy() == b) for b in range(int(table["bucket"].max()) + 1)]
    _, records = BucketBatches(buckets, DISTILL["batch_size"], 0)[position]
    shard, row = table.iloc[records[0]][["shard", "row"]]
    return int(shard), int(row)


def _faulty_shard(
    project: Path, change: Callable[[dict, int], None], run: str | None = None, keep_manifest: bool = False
) -> None:
    """Rewrite the shard distill reads next (`change(tensors, row)`), and give it steps to train. Written as
    synthesize would write it (the manifest's and the records' sums of the new file), it is a new data set: the
    checkpoint is another data set's, and the run starts at batch 0; else it resumes at batch 4."""
    from safetensors import safe_open

    from ladd.data.synthetic import RECORD_TENSORS, row_checksums

    edit_params(project, "distill", steps=DISTILL["steps"] + 2)
    k, row = _next_read(project, DISTILL["steps"] if keep_manifest else 0)
    path = _shard(project, k)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    change(tensors, row)
    save_file(tensors, path, metadata={"run": run or metadata["run"]})
    if (
        not keep_manifest
    ):  # as a synthesize run would have written it: the manifest's and the records' sums are the new file's
        synthetic = project / "data" / "synthetic"
        manifest = json.loads((synthetic / "manifest.json").read_text())
        manifest["shard_bytes"][k] = path.stat().st_size
        (synthetic / "manifest.json").write_text(json.dumps(manifest))
        records = pd.read_parquet(synthetic / "records.parquet")
        rows = (records["shard"] == k).to_numpy()
        for name in RECORD_TENSORS:
            if name in tensors:
                records.loc[rows, f"crc_{name}"] = np.array(row_checksums(tensors[name]))[records.loc[rows, "row"]]
        records.to_parquet(synthetic / "records.parquet", index=False)


def _nan_at(tensors, row):
    tensors["latents"][row, 0, 2, 2] = float("nan")


def _nan_record(project: Path) -> str:
    k, row = _next_read(project, 0)
    record = (
        pd.read_parquet(project / "data" / "synthetic" / "records.parquet")
        .query(f"shard == {k} and row == {row}")
        .iloc[0]
    )
    return f"{record['id']}#0 \\(shard-{k:05d}\\)"


def _write(path: Path, text: str) -> None:
    path.write_text(text)


_HELD_LOCKS: list[int] = []


@pytest.fixture(autouse=True)
def _release_held_locks():
    yield
    while _HELD_LOCKS:
        os.close(_HELD_LOCKS.pop())


def _another_run_holds(path: Path) -> None:
    """What a running stage holds: the flock of `<output>.lock`, with its pid inside."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.ftruncate(fd, 0)
    os.pwrite(fd, b"4242", 0)
    _HELD_LOCKS.append(fd)


def _held_under_torchrun(project: Path) -> None:
    """The checkpoint held by another run, and this run on 2 processes: rank 0's exit code must come through."""
    _another_run_holds(project / CHECKPOINT)
    edit_params(project, "launch", nproc_per_node=2)


def _edit(project: Path, **sections: dict) -> None:
    """edit_params for several sections at once."""
    for section, values in sections.items():
        edit_params(project, section, **values)


def _cuda_on_no_gpu(project: Path, **sections: dict) -> dict:
    """distill.device: cuda (plus `sections`), run where no GPU is visible, whatever this machine has."""
    _edit(project, distill={"device": "cuda"}, **sections)
    return {"CUDA_VISIBLE_DEVICES": ""}


def _prompts_only(project: Path, **evaluate) -> None:
    """The finished project's prompts as a prompts-only table, with `evaluate` settings."""
    table = project / "prompts.csv"
    load_split(project / "data/prepared/train").captions[["prompt"]].to_csv(table, index=False)
    _edit(project, prepare={"source": "prompts", "captions": str(table)}, evaluate=evaluate)


def _clip_folder(project: Path, **kwargs) -> str:
    return str(build_tiny_clip(project / "clip", **kwargs))


def _tear(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


# --- recoveries: what a fault that is handled by going on must have done --------------------------------------------


def _restarted_after_moving_the_torn_checkpoint(project: Path, before: dict, log: str) -> None:
    assert (
        hashlib.sha256((project / f"{CHECKPOINT}.corrupt").read_bytes()).hexdigest() == before[CHECKPOINT]
    )  # kept for a look, not deleted
    assert read_checkpoint_meta(project / CHECKPOINT)[0] == DISTILL["steps"]
    assert json.loads((project / RUN_REPORT).read_text())["resumed_from"] == 0


def _started_over_for_new_settings(project: Path, before: dict, log: str) -> None:
    assert (
        json.loads((project / RUN_REPORT).read_text())["resumed_from"] == 0
        and read_checkpoint_meta(project / CHECKPOINT)[0] == DISTILL["steps"]
    )
    stale = project / f"{CHECKPOINT}.stale-1"  # the other run's checkpoint, moved aside whole, never overwritten
    assert hashlib.sha256(stale.read_bytes()).hexdigest() == before[CHECKPOINT]


def _leftovers_cleared(project: Path, before: dict, log: str) -> None:
    assert "generator" in json.loads((project / "models" / "onnx" / "manifest.json").read_text())["models"]["fp32"]
    assert not list((project / "models").glob(".onnx.*")), "a killed export's temp copy or old folder was left"


def _killed_export(project: Path) -> None:
    """What SIGKILL leaves between replace_dir's two renames: the previous export moved to `.onnx.old`, the new
    one's temp copy beside it (half written)."""
    old = project / "models" / ".onnx.old"
    old.mkdir()
    (old / "manifest.json").write_text("{}")
    partial = project / "models" / ".onnx.k1ll3d.tmp"
    partial.mkdir()
    (partial / "generator.onnx").write_bytes(b"half a graph")


def _bomb(project: Path) -> None:
    """A PNG of 20000 x 10000 1-bit pixels (25 KB on disk): 200 MP, over PIL's decompression-bomb limit."""
    _images_folder(project, "9.png", np.zeros((32, 32), np.uint8))
    Image.new("1", (20000, 10000)).save(project / "incoming" / "9.png")


def _captions_table(project: Path, text: str | bytes, name: str = "captions.csv", **prepare) -> None:
    """Ten grey PNGs and a captions table holding `text` (bytes: written as they are)."""
    _images_folder(project, "9.png", np.zeros((32, 32), np.uint8))
    path = project / name
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    edit_params(project, "prepare", captions=name, **prepare)


def _table(rows: list[str]) -> str:
    return "file,caption,label\n" + "".join(f"{i}.png,grey,0\n" for i in range(9)) + "".join(r + "\n" for r in rows)


def _parquet_prompts(project: Path, prompts: list) -> None:
    pd.DataFrame({"prompt": prompts}).to_parquet(project / "prompts.parquet")
    _edit(
        project,
        prepare={"source": "prompts", "captions": "prompts.parquet"},
        evaluate={"features": "clip", "clip_path": _clip_folder(project)},
    )


def _outside_images(project: Path, name: str) -> None:
    """A captions row naming `name`, an image that lies outside images_dir (`secret.png` beside the folder)."""
    _images_folder(project, "9.png", np.zeros((32, 32), np.uint8))
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(project / "secret.png")
    if name == "link.png":
        (project / "incoming" / "link.png").symlink_to(project / "secret.png")
    name = str(project / "secret.png") if name == "absolute" else name
    table = pd.read_csv(project / "captions.csv")
    table.loc[9, "file"] = name
    table.to_csv(project / "captions.csv", index=False)


def _pickled_teacher(folder: Path) -> None:
    import torch
    from safetensors.torch import load_file

    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), weights.with_suffix(".bin"))
    weights.unlink()


def _credentials_in_uri(project: Path) -> dict:
    return {"LADD_TRACKING": "1", "MLFLOW_TRACKING_URI": f"http://alice:s3cr3t@127.0.0.1:{_free_port()}"}


@dataclass
class Fault:
    stage: str
    plant: Callable[[Path], dict | None]  # may return environment variables for the run
    code: int
    message: str | Callable[[Path], str]  # regex for the `ladd <stage>:` line (recoveries: for the log)
    recovered: Callable[[Path, dict, str], None] | None = None
    limit_file_size: int | None = None
    extra: tuple[str, ...] = field(default_factory=tuple)
    child: bool = False  # run in a child process (a file size limit, environment read at import, a recovery's log)


FAULTS = {
    # config: exit 2, before anything is read
    "config/unknown_key": Fault(
        "distill",
        lambda p: edit_params(p, "distill", stepz=5),
        2,
        r"params.yaml: unknown key distill.stepz \(known: out_dir",
    ),
    "config/unknown_section": Fault(
        "distill", lambda p: edit_params(p, "distil"), 2, r"params.yaml: unknown section 'distil'"
    ),
    "config/wrong_type": Fault(
        "distill", lambda p: edit_params(p, "distill", steps="many"), 2, r"distill.steps: expected int, got str 'many'"
    ),
    "config/probs": Fault(
        "distill",
        lambda p: edit_params(p, "distill", probs=[0.5] * 4),
        2,
        r"distill.probs must be 4 non-negative numbers summing to 1",
    ),
    "config/times_off_schedule": Fault(
        "distill",
        lambda p: edit_params(p, "distill", student_times=[1.0, 0.6, 0.3, 0.25]),
        2,
        r"distill.student_times must be the beta schedule's times .*got \[1.0, 0.6, 0.3, 0.25\]",
    ),
    "config/not_yaml": Fault(
        "prepare", lambda p: _write(p / "params.yaml", "prepare: [unclosed\n"), 2, r"params.yaml: not valid YAML"
    ),
    "config/missing_file": Fault(
        "prepare", lambda p: None, 2, r"params file not found: nope.yaml", extra=("--params", "nope.yaml")
    ),
    "config/unknown_encoding": Fault(
        "prepare",
        lambda p: edit_params(p, "prepare", encoding="latin-42"),
        2,
        r"prepare.encoding: 'latin-42' is not a text encoding",
    ),
    "config/cuda_without_a_gpu": Fault(
        "distill", _cuda_on_no_gpu, 2, r"device 'cuda' was asked for but CUDA is not available", child=True
    ),
    "launch/more_processes_than_gpus": Fault(
        "distill",
        lambda p: _cuda_on_no_gpu(p, launch={"nproc_per_node": 2}),
        2,
        r"launch.nproc_per_node is 2 but this node has 0 GPUs",
        child=True,
    ),
    "launch/parallel_none_on_two_processes": Fault(
        "distill",
        lambda p: _edit(p, distill={"parallel": "none"}, launch={"nproc_per_node": 2}),
        2,
        r"distill.parallel is none but launch asks for 2 processes",
    ),
    "launch/batch_not_divisible": Fault(
        "distill",
        lambda p: edit_params(p, "launch", nproc_per_node=3),
        2,
        r"distill.batch_size \(4\) is the global batch: it must divide evenly over "
        r"launch's 3 processes",
    ),
    "launch/nodes_without_rendezvous": Fault(
        "distill", lambda p: edit_params(p, "launch", nnodes=2), 2, r"launch.nnodes > 1 needs launch.rdzv_endpoint"
    ),
    "launch/endpoint_not_host_port": Fault(
        "distill",
        lambda p: edit_params(p, "launch", rdzv_endpoint="node0"),
        2,
        r"launch.rdzv_endpoint must be host:port, got 'node0'",
    ),
    "launch/rendezvous_unreachable": Fault(
        "distill",
        lambda p: edit_params(p, "launch", nnodes=2, rdzv_endpoint="192.0.2.1:29400", rdzv_timeout=2),
        2,
        r"launch.rdzv_endpoint 192.0.2.1:29400 did not answer within 2 s: start the first node",
    ),
    # prompts: exit 3 naming the records
    "prompts/empty_and_too_long": Fault(
        "validate",
        lambda p: _edit_captions(p, _set_prompts({5: "", 7: "x" * 400})),
        3,
        r"prompts_train.*'prompt' failed for records \['digits-\d+', 'digits-\d+'\]",
    ),
    "prompts/captions_and_images_disagree": Fault(
        "validate",
        lambda p: _edit_captions(p, lambda f: f.iloc[:-3]),
        3,
        r"data/prepared/train: \d+ records in captions.parquet but \d+ images",
    ),
    "prompts/table_without_prompts": Fault(
        "prepare", _prompts_without_prompt_column, 3, r"prompts.csv: needs a 'prompt' or 'caption' column"
    ),
    # images: exit 3 naming row, id and file
    "images/1x1": Fault(
        "prepare",
        lambda p: _images_folder(p, "9.png", np.zeros((1, 1), np.uint8)),
        3,
        r"captions.csv row 9 \(id .*\): cannot read image .*9.png: it is 1x1, under a quarter",
    ),
    "images/not_an_image": Fault(
        "prepare",
        lambda p: _images_folder(p, "x.png", b"not a png"),
        3,
        r"captions.csv row 9 .*: cannot read image .*x.png: cannot identify image file",
    ),
    "images/missing_file": Fault(
        "prepare",
        lambda p: _images_folder(p, "x.png", None),
        3,
        r"captions.csv row 9 .*: cannot read image .*x.png: .*No such file",
    ),
    "images/no_file_column": Fault(
        "prepare",
        lambda p: _images_folder(p, "9.png", np.zeros((32, 32), np.uint8), "path"),
        3,
        r"captions.csv: needs a 'file' column",
    ),
    "images/outside_the_folder": Fault(
        "prepare",
        lambda p: _outside_images(p, "../secret.png"),
        3,
        r"captions.csv row 9 .*: file '../secret.png' lies outside prepare.images_dir",
    ),
    "images/absolute_path": Fault(
        "prepare",
        lambda p: _outside_images(p, "absolute"),
        3,
        r"captions.csv row 9 .*: file '/.*secret.png' lies outside prepare.images_dir",
    ),
    "images/link_leading_out": Fault(
        "prepare",
        lambda p: _outside_images(p, "link.png"),
        3,
        r"captions.csv row 9 .*: file 'link.png' lies outside prepare.images_dir",
    ),
    "images/decompression_bomb": Fault(
        "prepare", _bomb, 3, r"captions.csv row 9 .*: cannot read image .*9.png: Image size \(200000000 pixels\)"
    ),
    "images/over_the_pixel_cap": Fault(
        "prepare",
        lambda p: _captions_table(p, _table([]), max_image_pixels=1000),
        3,
        r"captions.csv row 0 .*: it is 32x32, over prepare.max_image_pixels \(1,000\)",
    ),
    # tables: exit 3 naming the file, line or rows
    "tables/latin1": Fault(
        "prepare",
        lambda p: _captions_table(p, _table(["9.png,café,0"]).encode("latin-1")),
        3,
        r"captions.csv: line 11 \(byte \d+\) is not utf-8 text: .*set prepare.encoding",
    ),
    "tables/empty_label": Fault(
        "prepare",
        lambda p: _captions_table(p, _table(["9.png,grey,"])),
        3,
        r"captions.csv: row 9 \(id captions-000009\): label is not an integer",
    ),
    "tables/null_prompt_in_parquet": Fault(
        "prepare",
        lambda p: _parquet_prompts(p, ["a seven", None, "a one"]),
        3,
        r"prompts.parquet: row 1 \(id prompts-000001\) has no prompt",
    ),
    "tables/control_characters": Fault(
        "prepare",
        lambda p: _parquet_prompts(p, ["a seven", "a\x00one"]),
        3,
        r"prompts.parquet: row 1 .*: the prompt holds control characters",
    ),
    "tables/not_a_table": Fault(
        "prepare",
        lambda p: _captions_table(p, b"PAR1\x00garbage", name="captions.parquet"),
        3,
        r"captions.parquet: cannot be read as a parquet table",
    ),
    # teacher folder: exit 5 naming the folder or id, models/teacher untouched
    "teacher/other_pipeline": Fault(
        "teacher",
        lambda p: _teacher_variant(p, lambda f: _pipeline_class(f, "StableDiffusionPipeline")),
        5,
        r"elsewhere/sd3 holds a StableDiffusionPipeline, not an SD3-family pipeline",
    ),
    "teacher/no_transformer": Fault(
        "teacher",
        lambda p: _teacher_variant(p, lambda f: shutil.rmtree(f / "transformer")),
        5,
        r"elsewhere/sd3 is not a complete SD3-family pipeline: missing transformer/",
    ),
    "teacher/no_such_folder": Fault(
        "teacher",
        lambda p: edit_params(p, "teacher", pretrained="/nonexistent/sd3"),
        5,
        r"/nonexistent/sd3 is not a folder, nor a hub id",
    ),
    "teacher/pickled_weights_only": Fault(
        "teacher",
        lambda p: _teacher_variant(p, _pickled_teacher),
        5,
        r"elsewhere/sd3/transformer holds only pickled weights \(.bin\)",
    ),
    "teacher/hub_unreachable": Fault(
        "teacher", _offline_hub_id, 5, r"cannot load someone/no-such-model from the Hub or its local cache", child=True
    ),
    # synthetic data: distill refuses it (exit 3 or 4) naming the file and records; the change of bytes is found by the
    # file's size at start when that changed, else by the records' CRC-32 when read
    "synthetic/nan_latent": Fault(
        "distill",
        lambda p: _faulty_shard(p, _nan_at),
        3,
        lambda p: rf"1 synthetic latents are not finite, e.g. records {_nan_record(p)}",
    ),
    "synthetic/foreign_shard": Fault(
        "distill",
        lambda p: _faulty_shard(p, lambda t, r: None, run="another run"),
        3,
        lambda p: (
            rf"shard-{_next_read(p, 0)[0]:05d}.safetensors was not written by the run "
            r".*manifest.json describes"
        ),
    ),
    "synthetic/bytes_changed": Fault(
        "distill",
        lambda p: _faulty_shard(p, _nan_at, keep_manifest=True),
        3,
        lambda p: (
            rf"the content of shard-{_next_read(p)[0]:05d}.safetensors no longer "
            r"matches (what .*manifest.json lists|its checksums in .*records.parquet)"
        ),
    ),
    "synthetic/made_with_other_settings": Fault(
        "distill",
        lambda p: edit_params(p, "synthesize", guidance=3.5),
        4,
        r"data/synthetic was made with other synthesize settings than "
        r"params.yaml's \(guidance: [\d.]+ -> 3.5\): run `ladd synthesize` first",
    ),
    "synthetic/missing_shard": Fault(
        "distill",
        lambda p: _shard(p, 1).unlink(),
        4,
        r"data/synthetic/shard-00001.safetensors is missing \(listed in .*manifest.json\)",
    ),
    "synthetic/missing_records": Fault(
        "distill",
        lambda p: (p / "data/synthetic/records.parquet").unlink(),
        4,
        r"data/synthetic/records.parquet is missing",
    ),
    "synthetic/suite_fails_on_new_data": Fault(
        "synthesize", _new_settings_failing_their_suite, 3, r"suite 'synthetic' failed"
    ),
    "synthetic/disk_full": Fault(
        "synthesize", lambda p: _shard(p, 1).unlink(), 8, r"File too large", limit_file_size=200_000, child=True
    ),
    # checkpoint
    "checkpoint/steps_below_it": Fault(
        "distill", lambda p: edit_params(p, "distill", steps=2), 2, rf"distill.steps is 2 but {CHECKPOINT} is at step 4"
    ),
    "checkpoint/torn": Fault(
        "distill",
        lambda p: _tear(p / CHECKPOINT),
        0,
        rf"checkpoint {CHECKPOINT} is unreadable .*moved to {CHECKPOINT}.corrupt at this run's first "
        r"checkpoint, starting from step 0",
        recovered=_restarted_after_moving_the_torn_checkpoint,
        child=True,
    ),
    "checkpoint/other_settings": Fault(
        "distill",
        lambda p: edit_params(p, "distill", lr_g=2e-5),
        0,
        rf"{CHECKPOINT} was written for other settings or data \(lr_g\): moved to "
        rf"{CHECKPOINT}.stale-1 at this run's first checkpoint, starting from step 0",
        recovered=_started_over_for_new_settings,
        child=True,
    ),
    "checkpoint/another_run_is_writing_it": Fault(
        "distill",
        lambda p: _another_run_holds(p / CHECKPOINT),
        8,
        rf"{CHECKPOINT} is being written by another run \(pid 4242,",
    ),
    "synthetic/another_run_is_writing_it": Fault(
        "synthesize",
        lambda p: _another_run_holds(p / "data" / "synthetic"),
        8,
        r"data/synthetic is being written by another run \(pid 4242,",
    ),
    "prepare/another_run_is_writing_it": Fault(
        "prepare",
        lambda p: _another_run_holds(p / "data" / "prepared"),
        8,
        r"data/prepared is being written by another run \(pid 4242,",
    ),
    "validate/another_run_is_writing_it": Fault(
        "validate",
        lambda p: _another_run_holds(p / "reports" / "validation" / "data"),
        8,
        r"reports/validation/data is being written by another run \(pid 4242,",
    ),
    "classifier/another_run_is_writing_it": Fault(
        "classifier",
        lambda p: _another_run_holds(p / "models" / "classifier"),
        8,
        r"models/classifier is being written by another run \(pid 4242,",
    ),
    "teacher/another_run_is_writing_it": Fault(
        "teacher",
        lambda p: _another_run_holds(p / "models" / "teacher"),
        8,
        r"models/teacher is being written by another run \(pid 4242,",
    ),
    "evaluate/another_run_is_writing_it": Fault(
        "evaluate",
        lambda p: _another_run_holds(p / "reports" / ".evaluate"),
        8,
        r"reports/.evaluate is being written by another run \(pid 4242,",
    ),
    "export/another_run_is_writing_it": Fault(
        "export",
        lambda p: _another_run_holds(p / "models" / "onnx"),
        8,
        r"models/onnx is being written by another run \(pid 4242,",
    ),
    "export/killed_between_two_renames": Fault("export", _killed_export, 0, r"", recovered=_leftovers_cleared),
    "launch/a_worker_keeps_its_exit_code": Fault(
        "distill", _held_under_torchrun, 8, rf"{CHECKPOINT} is being written by another run \(pid 4242,"
    ),
    # evaluation extractors from local weights: a missing or wrong one fails before any sampling (exit 2)
    "evaluate/inception_path_missing": Fault(
        "evaluate",
        lambda p: edit_params(p, "evaluate", features="inception", inception_path="/nonexistent/inception.pth"),
        2,
        r"evaluate.inception_path: path does not exist: /nonexistent/inception.pth",
    ),
    "evaluate/inception_is_another_network": Fault(
        "evaluate",
        lambda p: edit_params(
            p,
            "evaluate",
            features="inception",
            inception_path="models/student/transformer/diffusion_pytorch_model.safetensors",
        ),
        2,
        r"evaluate.inception_path: models/student/transformer/diffusion_pytorch_model.safetensors does not hold "
        r"the FID "
        r"Inception-v3 network",
    ),
    "evaluate/clip_is_not_a_clip_model": Fault(
        "evaluate",
        lambda p: edit_params(p, "evaluate", features="clip", clip_path="models/teacher/text_encoder"),
        2,
        r"evaluate.clip_path: models/teacher/text_encoder holds a 'clip_text_model' model, not a CLIP model",
    ),
    "evaluate/clip_of_the_wrong_image_size": Fault(
        "evaluate",
        lambda p: edit_params(p, "evaluate", features="clip", clip_path=_clip_folder(p, crop_size=48)),
        2,
        r"evaluate.clip_path: .*clip does not load as a CLIP model: .*Input image size \(48\*48\)",
    ),
    "evaluate/classifier_on_prompts_only": Fault(
        "evaluate",
        lambda p: _prompts_only(p, features="classifier"),
        2,
        r"evaluate.features: classifier needs labelled images, and .*prompts.csv",
    ),
    "evaluate/no_extractor_for_prompts_only": Fault(
        "evaluate",
        lambda p: _prompts_only(p),
        2,
        r"evaluate.features: auto finds no extractor .*evaluate.clip_path .*evaluate.inception_path",
    ),
    "evaluate/real_image_fid_on_prompts_only": Fault(
        "evaluate",
        lambda p: _prompts_only(p, features="clip", clip_path=_clip_folder(p), real_images="required"),
        2,
        r"evaluate.real_images: required, but prepare.source is prompts",
    ),
    # tracking server: exit 7 before any work
    "tracking/server_down": Fault(
        "prepare", _unreachable_tracking, 7, r"MLflow tracking server http://127.0.0.1:\d+ is unreachable"
    ),
    "tracking/credentials_in_the_uri": Fault(
        "prepare",
        _credentials_in_uri,
        7,
        r"MLflow tracking server http://alice:\*\*\*@127.0.0.1:\d+ is unreachable "
        r"\((?!.*s3cr3t)",
    ),
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_planted_fault(name, project, monkeypatch, capfd):
    """Most faults run `ladd.cli.main` in this process (the CLI's code path without 4 s of imports per case)."""
    fault = FAULTS[name]
    env = fault.plant(project) or {}
    before = outputs(project)
    args = [fault.stage, *(() if "LADD_TRACKING" in env else ("--no-tracking",)), *fault.extra]
    if fault.child:
        proc = subprocess.run(
            [sys.executable, "-m", "ladd.cli", *args, "--threads", "1"],
            cwd=project,
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            preexec_fn=_limit_file_size(fault.limit_file_size) if fault.limit_file_size else None,
        )
        code, stderr = proc.returncode, proc.stderr
    else:
        from ladd.cli import main

        monkeypatch.chdir(project)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        code, stderr = main(args), capfd.readouterr().err  # fd-level: torchrun workers write there too
    message = fault.message(project) if callable(fault.message) else fault.message
    assert code == fault.code, stderr[-3000:]
    assert "Traceback" not in stderr and "requires torchvision" not in stderr, stderr[-3000:]
    if fault.recovered:
        assert re.search(message, stderr), stderr[-3000:]
        fault.recovered(project, before, stderr)
        return
    lines = [line for line in stderr.splitlines() if line.startswith(f"ladd {fault.stage}: ")]
    assert len(lines) == 1 and re.search(message, lines[0]), stderr[-3000:]
    assert outputs(project) == before
    assert not [p for p in project.rglob(".*.tmp")], "a torn temp file was left behind"


def test_debug_gives_the_traceback(project, monkeypatch):
    from ladd.cli import main

    edit_params(project, "distill", steps=2)
    monkeypatch.chdir(project)
    with pytest.raises(ConfigError, match="distill.steps is 2"):
        main(["distill", "--no-tracking", "--debug"])


def test_out_of_gpu_memory_is_one_line_with_advice(project, monkeypatch, capfd):
    """CUDA's out-of-memory error, raised where a stage raises it (no GPU here to fill): one line, exit 9."""
    import torch

    from ladd import cli

    def out_of_memory(params, tracker):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.19 GiB total)")

    monkeypatch.setitem(cli.STAGES, "distill", out_of_memory)
    monkeypatch.chdir(project)
    code, stderr = cli.main(["distill", "--no-tracking"]), capfd.readouterr().err
    lines = [line for line in stderr.splitlines() if line.startswith("ladd distill: ")]
    assert code == 9 and "Traceback" not in stderr, stderr
    assert len(lines) == 1 and "out of GPU memory (CUDA out of memory. Tried to allocate 20.00 GiB" in lines[0]
    assert "batch_size" in lines[0] and "gradient_checkpointing" in lines[0]


def test_a_failing_champion_lookup_promotes_nothing(project, tiny_classifier_dir, monkeypatch, capfd):
    """Only "no such model" or "no champion yet" mean there is no champion: any other answer of the registry (a
    server error, no permission) stops the stage (exit 7) before a version is registered without the gate."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from ladd.cli import main

    def refuse(self, name, alias):
        raise MlflowException("PERMISSION_DENIED: user may not read ladd-student", error_code="PERMISSION_DENIED")

    shutil.copytree(tiny_classifier_dir, project / "models" / "classifier")
    edit_params(project, "evaluate", num_samples=8, few_steps=[4], teacher_steps=2, seeds=[1, 2], grid_size=4)
    monkeypatch.chdir(project)
    store = f"sqlite:///{project / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("LADD_TRACKING", "1")
    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", refuse)
    code, stderr = main(["evaluate"]), capfd.readouterr().err
    lines = [line for line in stderr.splitlines() if line.startswith("ladd evaluate: ")]
    assert code == 7 and len(lines) == 1, stderr[-3000:]
    assert "cannot read the champion of ladd-student" in lines[0] and "PERMISSION_DENIED" in lines[0]
    assert MlflowClient(store).search_model_versions("name = 'ladd-student'") == []
    assert "student" in json.loads((project / "reports" / "metrics.json").read_text())  # the figures are kept


def test_a_second_flow_run_in_the_workspace_is_refused(project):
    """Two flows in one workspace would interleave their stages: the second is refused at once, in one line."""
    (project / ".dvc" / "tmp").mkdir(parents=True)
    _another_run_holds(project / ".dvc" / "tmp" / "ladd-pipeline")
    params = (project / "params.yaml").read_bytes()
    proc = subprocess.run(
        [sys.executable, "-m", "flows.pipeline", str(project), "other.yaml"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 8, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        f"ladd pipeline: another ladd pipeline is running in {project} (pid 4242,"
    ), proc.stderr
    assert (project / "params.yaml").read_bytes() == params  # nothing copied over it


def test_the_flow_checks_every_setting_before_its_first_stage(smoke_project):
    """Times off their schedule are distill's check (its module is not the early stages' code): the flow makes it
    before Prefect starts, so a bad edit never costs a teacher run."""
    project = smoke_project
    edit_params(project, "distill", student_times=[1.0, 0.6, 0.3, 0.25])
    proc = subprocess.run(
        [sys.executable, "-m", "flows.pipeline", str(project)], cwd=ROOT, capture_output=True, text=True
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("ladd pipeline: distill.student_times must be the beta schedule's times"), lines
    with pytest.raises(ConfigError, match="student_times"):  # and a deployment's flow run, inside Prefect
        _pipeline(project, "params.yaml")
    assert not (project / "dvc.lock").exists() and not (project / "data" / "prepared").exists()


# --- interruptions at a random point -------------------------------------------------------------------------------


def _make_work(stage: str, project: Path) -> Path:
    """Give `stage` work that takes a while; returns the output whose final bytes are compared."""
    if stage == "synthesize":
        edit_params(project, "synthesize", seed=1, shard_size=128, steps=2)  # a new data set of 12 shards
        return project / "data" / "synthetic"
    edit_params(project, "distill", steps=16, checkpoint_every=1)  # resumes from step 4
    return project / "models" / "student"


@pytest.fixture(scope="module")
def uninterrupted(finished_project, tmp_path_factory):
    """Per stage: (seconds from the stage's first log line to its `done` line, hashes of its output) of a run
    without interruption, the reference for the interrupted ones."""
    cache = {}

    def run(stage):
        if stage not in cache:
            root = tmp_path_factory.mktemp(f"whole_{stage}") / "project"
            shutil.copytree(finished_project, root)
            out = _make_work(stage, root)
            proc = subprocess.Popen(
                ladd_cmd(stage), cwd=root, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint
            )
            started = _wait_for_start(proc, stage)
            assert proc.wait(timeout=300) == 0
            proc.reader.join(timeout=30)
            cache[stage] = proc.done_at - started, outputs(root), out.relative_to(root)
        return cache[stage]

    return run


def _default_sigint() -> None:
    """In the child: SIGINT raises KeyboardInterrupt, as in a terminal, even when the tests run in a background
    job (whose children inherit SIGINT ignored, and Python then installs no handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for_start(proc, stage: str) -> float:
    """Read stderr until the stage logs its work started (so the signal lands in the stage, not in imports);
    a thread reads the rest and notes when the stage logged `<stage> done`."""
    import threading

    for line in proc.stderr:
        if f" INFO {stage}: " in line:
            break
    proc.tail, proc.done_at = [], None

    def read():
        for line in proc.stderr:
            proc.tail.append(line)
            if f"ladd INFO {stage} done:" in line:
                proc.done_at = time.time()

    proc.reader = threading.Thread(target=read, daemon=True)
    proc.reader.start()
    return time.time()


@pytest.mark.slow  # a child process per run, killed and rerun
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
@pytest.mark.parametrize("stage", ["synthesize", "distill"])
def test_interrupted_at_a_random_point_then_the_same_command_finishes_the_same(stage, sig, project, uninterrupted):
    duration, reference, out = uninterrupted(stage)
    seed = int(os.environ.get("LADD_FAULT_SEED", time.time_ns() % 10**6))
    delay = random.Random(seed).uniform(0, 0.8 * duration)
    _make_work(stage, project)
    before = _under(outputs(project), out)
    proc = subprocess.Popen(ladd_cmd(stage), cwd=project, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    _wait_for_start(proc, stage)
    time.sleep(delay)
    replay = f"replay with LADD_FAULT_SEED={seed} (signal {delay:.2f} s into a {duration:.1f} s run)"
    assert proc.poll() is None, f"the run ended before the signal; {replay}"
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    proc.reader.join(timeout=30)
    time.sleep(0.2)
    if sig == signal.SIGINT and code == 0 and proc.done_at is not None:
        pass  # this run outpaced the reference: the stage had logged `done` and was exiting when SIGINT landed
    elif sig == signal.SIGINT:
        assert code == 130, f"{''.join(proc.tail)[-2000:]}; {replay}"
        assert any(f"ladd {stage}: interrupted" in line for line in proc.tail), replay
        assert not any("Traceback" in line for line in proc.tail), replay
    else:
        assert code == -signal.SIGKILL
    # the output is the previous one or the finished new one (replaced whole at the end), never a torn mix
    assert _comparable(_under(outputs(project), out)) in (_comparable(before), _comparable(_under(reference, out))), (
        replay
    )
    rerun = subprocess.run(ladd_cmd(stage), cwd=project, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _comparable(_under(outputs(project), out)) == _comparable(_under(reference, out)), replay


def _under(hashes: dict, folder: Path) -> dict:
    return {k: v for k, v in hashes.items() if k.startswith(f"{folder.as_posix()}/")}


def _comparable(hashes: dict) -> dict:
    """Without the files that record how a run went (resumed from, seconds per step) rather than what it made."""
    return {k: v for k, v in hashes.items() if not k.endswith(("ladd_train_summary.json", "README.md"))}


# --- faults handled below the CLI -----------------------------------------------------------------------------------


def test_a_synthesize_rerun_with_nothing_to_do_keeps_the_checkpoint(project, monkeypatch):
    """What identifies the data is its content: rerunning a finished synthesize leaves every byte, so distill
    resumes instead of starting over."""
    from ladd.cli import main

    monkeypatch.chdir(project)
    before = outputs(project)
    assert main(["synthesize", "--no-tracking"]) == 0
    assert outputs(project) == before and not (project / "data" / "synthetic.next").exists()
    edit_params(project, "distill", steps=6)
    assert main(["distill", "--no-tracking"]) == 0
    assert json.loads((project / RUN_REPORT).read_text())["resumed_from"] == 4


def test_16_bit_greyscale_pngs_keep_their_values(tmp_path):
    """PIL's convert("RGB") clips 16-bit values at 255 (a white image); prepare scales them to 8 bits."""
    ramp = np.arange(32 * 32, dtype=np.float64).reshape(32, 32) / (32 * 32 - 1)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.round(ramp * 65535).astype(np.uint16)).save(images / "deep.png")
    pd.DataFrame({"file": ["deep.png"] * 10, "caption": [f"a ramp {i}" for i in range(10)]}).to_csv(
        tmp_path / "captions.csv"
    )
    out = tmp_path / "prepared"
    prepare(
        PrepareConfig(
            source="folder",
            images_dir=str(images),
            captions=str(tmp_path / "captions.csv"),
            resolution=32,
            out_dir=str(out),
        )
    )
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


def test_synthesize_keeps_the_previous_data_set_until_the_new_one_passes(project, monkeypatch, caplog):
    """Changed settings build the new set in <out>.next; a failing suite leaves <out> whole and the new set there
    for a look; once the suite passes it replaces <out> without generating anything again."""
    from ladd.cli import main

    monkeypatch.chdir(project)
    before = outputs(project)
    edit_params(project, "synthesize", guidance=1.5)
    edit_params(project, "validate", latent_tolerance=1e-6)
    assert main(["synthesize", "--no-tracking"]) == 3
    assert outputs(project) == before
    staged = project / "data" / "synthetic.next"
    assert json.loads((staged / "manifest.json").read_text())["run"]["guidance"] == 1.5
    edit_params(project, "validate", latent_tolerance=0.5)
    caplog.set_level("INFO")
    assert main(["synthesize", "--no-tracking"]) == 0
    assert "0 shards to generate" in caplog.text and not staged.exists()
    assert json.loads((project / "data/synthetic/manifest.json").read_text())["run"]["guidance"] == 1.5
