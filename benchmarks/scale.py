"""Benchmark: memory and time of the data path as the prompt list grows.

    .venv/bin/python benchmarks/scale.py [--quick] [--sizes 1000 4000 16000] [--against OLD_CHECKOUT] [--json F]

A teacher of SD3.5's text widths (CLIP-L 768 + CLIP-G 1280, T5 d_model 4096 at 256 tokens, so a prompt's
embedding is [333, 4096] as in SD3.5; a layer or two of each, a tiny MMDiT, 64x64 images), built offline. For each
N: a prompts-only project of N distinct training prompts and N held-out ones, `ladd synthesize` (1 sample per
prompt, embeddings stored in bf16 as on a GPU), `ladd distill` and `ladd evaluate`, each a child process whose
peak RSS (`wait4`) and own timings (the distill run report) are read. At the smallest N it also times bare
teacher sampling of the same batches (encode_prompts + generate_latents, nothing stored) against synthesize, and,
with `--against`, the same synthesize + distill from another checkout (e.g. `git worktree add /tmp/old <commit>`)
side by side. The machine is printed above the table; the last line is `peak_rss_ratio <x>`: the largest of
distill's and evaluate's peak RSS at the largest N over that at the smallest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the project's builder of SD3-family folders
sys.path.insert(0, str(ROOT / "benchmarks"))

WORDS = [f"w{i}" for i in range(400)]  # single tokens: prompts of 6 words from 400 are all distinct
DISTILL_STEPS, BATCH = 30, 8


def build_teacher(folder: Path) -> Path:
    from sd3_family import build_sd35_like_teacher

    return build_sd35_like_teacher(
        folder,
        sample_size=8,
        words=WORDS,
        clip_dims=(768, 1280),
        t5_dim=4096,
        clip_max_length=77,
        t5_max_length=256,
        text_layers=1,
        text_ff=64,
    )


def prompts(n: int, seed: int) -> list[str]:
    import numpy as np

    rng, out, seen = np.random.default_rng(seed), [], set()
    while len(out) < n:
        p = "a " + " ".join(rng.choice(WORDS, 6))
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def project(root: Path, teacher: Path, n: int, clip: Path, current: bool = True) -> Path:
    """A prompts-only project: N training and N held-out prompts, params for a short run of every stage (without
    the keys an older checkout does not know, which stores float32)."""
    root.mkdir(parents=True)
    table = prompts(2 * n, seed=n)
    pd.DataFrame({"id": [f"p{i}" for i in range(2 * n)], "prompt": table}).to_csv(root / "prompts.csv", index=False)
    params = {
        "prepare": {"source": "prompts", "captions": "prompts.csv", "test_fraction": 0.5},
        "validate": {"classes": 0},
        "teacher": {"pretrained": str(teacher)},
        "synthesize": {
            "steps": 4,
            "samples_per_prompt": 1,
            "batch_size": 64,
            "shard_size": 1024,
            "guidance": 2.0,
            "storage_dtype": "bfloat16",
            "device": "cpu",
        },
        "distill": {
            "steps": DISTILL_STEPS,
            "batch_size": BATCH,
            "warmup_steps": 5,
            "checkpoint_every": DISTILL_STEPS,
            "log_every": 10,
            "device": "cpu",
        },
        "evaluate": {
            "teacher_steps": 2,
            "few_steps": [1],
            "seeds": [0],
            "gate_metric": "fd_teacher_same_noise",
            "batch_size": 64,
            "grid_size": 8,
            "features": "clip",
            "clip_path": str(clip),
            "register": False,
            "device": "cpu",
        },
    }
    if not current:
        del params["synthesize"]["storage_dtype"]
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def bare_sampling(root: Path) -> None:
    """The teacher's own work for synthesize's batches, in a child as the stage runs: load the pipeline, encode the
    prompts, sample with CFG (path states kept), store nothing."""
    from ladd.config import SynthesizeConfig
    from ladd.data.prepare import load_split
    from ladd.generate import generate_latents, record_noise
    from ladd.pipeline import encode_prompts, latent_shape, load_pipeline, max_sequence_length
    from ladd.sampling import flow_sigmas

    params = yaml.safe_load((root / "params.yaml").read_text())["synthesize"]
    cfg = SynthesizeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})
    pipe = load_pipeline(root / "models" / "teacher")
    msl = max_sequence_length(root / "models" / "teacher")
    train = list(load_split(root / "data" / "prepared" / "train").captions["prompt"])
    sigmas, shape = flow_sigmas(cfg.steps, pipe.scheduler.config.shift), latent_shape(pipe)
    null_e, null_p = encode_prompts(pipe, [""], msl)
    for i in range(0, len(train), cfg.shard_size):
        chunk = train[i : i + cfg.shard_size]
        e, p = encode_prompts(pipe, chunk, msl, batch_size=cfg.batch_size)
        generate_latents(
            pipe.transformer,
            e,
            p,
            record_noise(list(range(i, i + len(chunk))), shape),
            sigmas,
            cfg.guidance,
            null_e,
            null_p,
            batch_size=cfg.batch_size,
            path_times=cfg.trajectory_times,
        )


def child(args: list[str], root: Path, code_root: Path = ROOT) -> dict:
    """Run `python <args>` in `root` as a child; its wall time and peak RSS (GB, from wait4)."""
    env = {**os.environ, "PYTHONPATH": str(code_root), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{args} failed in {root}:\n{err[-3000:]}")
    return {"seconds": time.perf_counter() - start, "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9}


def stage(root: Path, name: str, code_root: Path = ROOT) -> dict:
    return child(["-m", "ladd.cli", name, "--no-tracking"], root, code_root)


def million_records(work: Path, records: int = 1_000_000, samples: int = 4, shard_size: int = 1024) -> dict:
    """A records table and manifest as synthesize writes them for 1M records (250k prompts x 4): their size on
    disk, and the time to load the table whole and distill's columns of it."""
    import hashlib

    import numpy as np

    from ladd.data.synthetic import READ_COLUMNS

    rng = np.random.default_rng(0)
    n_prompts = records // samples
    prompt_index = np.repeat(np.arange(n_prompts), samples)
    table = pd.DataFrame(
        {
            "id": np.repeat([f"p{i}" for i in range(n_prompts)], samples),
            "prompt": np.repeat([" ".join(rng.choice(WORDS, 8)) for _ in range(n_prompts)], samples),
            "label": -1,
            "sample": np.tile(np.arange(samples), n_prompts),
            "seed": np.arange(records),
            "bucket": 0,
            "shard": np.arange(records) // shard_size,
            "row": np.arange(records) % shard_size,
            "prompt_index": prompt_index,
            **{
                f"crc_{n}": rng.integers(0, 2**32, records)
                for n in ("latents", "trajectory", "prompt_embeds", "pooled_prompt_embeds")
            },
        }
    )
    path = work / "records.parquet"
    table.to_parquet(path, index=False)
    shards, embeds = -(-records // shard_size), -(-n_prompts // shard_size)
    digest = hashlib.sha256(b"").hexdigest()
    manifest = {
        "shard_files": [f"shard-{k:05d}.safetensors" for k in range(shards)],
        "shard_sha256": [digest] * shards,
        "shard_bytes": [1 << 30] * shards,
        "shard_buckets": [0] * shards,
        "embed_files": [f"embeds-{k:05d}.safetensors" for k in range(embeds)],
        "embed_sha256": [digest] * embeds,
        "embed_bytes": [1 << 30] * embeds,
    }
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2))
    start = time.perf_counter()
    pd.read_parquet(path)
    whole = time.perf_counter() - start
    start = time.perf_counter()
    columns = pd.read_parquet(path, columns=READ_COLUMNS + ["crc_latents", "crc_trajectory"])
    read = time.perf_counter() - start
    return {
        "records": records,
        "table_mb": path.stat().st_size / 1e6,
        "manifest_kb": (work / "manifest.json").stat().st_size / 1e3,
        "load_whole_s": whole,
        "load_distill_columns_s": read,
        "distill_columns_mb": columns.memory_usage(index=False).sum() / 1e6,
    }


def measure(work: Path, teacher: Path, clip: Path, n: int, code_root: Path = ROOT, full: bool = True) -> dict:
    root = project(work / f"{code_root.name}-n{n}", teacher, n, clip, current=code_root == ROOT)
    for name in ("prepare", "teacher"):
        stage(root, name, code_root)
    row = {"n": n, "synthesize": stage(root, "synthesize", code_root), "distill": stage(root, "distill", code_root)}
    report_path = root / "reports" / "distill.json"  # an older checkout (--against) wrote it beside the checkpoint
    report = json.loads(
        (report_path if report_path.is_file() else root / "models/checkpoints/distill.run.json").read_text()
    )
    row["sec_per_step"], row["seconds_to_first_step"] = report["sec_per_step"], report.get("seconds_to_first_step")
    if full:
        row["evaluate"] = stage(root, "evaluate", code_root)
        synthetic = root / "data" / "synthetic"
        row["synthetic_gb"] = sum(f.stat().st_size for f in synthetic.iterdir()) / 1e9
        shutil.rmtree(synthetic)  # 2.7 MB a prompt: the next N needs the disk
    row["root"] = str(root)
    return row


def main(argv=None) -> dict:
    from machine import describe

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="N = 100, 200, 400 (under 5 minutes on 2 cores)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="N distinct prompts (default 1000 4000 16000)")
    ap.add_argument("--against", type=Path, help="another checkout: its synthesize + distill at the smallest N")
    ap.add_argument("--work", type=Path, help="folder for the projects (default: a temp folder, removed)")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--bare-sampling", type=Path, help=argparse.SUPPRESS)  # the child that times bare sampling
    args = ap.parse_args(argv)
    if args.bare_sampling:
        return bare_sampling(args.bare_sampling)
    sizes = args.sizes or ([100, 200, 400] if args.quick else [1000, 4000, 16000])
    print(describe())
    work = args.work or Path(tempfile.mkdtemp(prefix="ladd-scale-"))
    try:
        teacher = build_teacher(work / "teacher")
        from sd3_family import build_tiny_clip

        clip = build_tiny_clip(work / "clip", image_size=64, words=WORDS)
        rows = [measure(work, teacher, clip, n) for n in sizes]
        first = rows[0]
        bare = child([__file__, "--bare-sampling", first["root"]], Path(first["root"]))["seconds"]
        synth = first["synthesize"]["seconds"]
        old = measure(work, teacher, clip, sizes[0], args.against.resolve(), full=False) if args.against else None
        million = million_records(work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    print(
        f"\nSD3.5 text widths ([333, 4096] per prompt), tiny MMDiT, 64x64 images; distill {DISTILL_STEPS} steps at "
        f"batch {BATCH}; evaluate 1 seed x N held-out prompts (teacher 2 steps, naive 1, student 1)"
    )
    print(
        "| N prompts | synthetic set (GB) | synthesize (s) | distill peak RSS (GB) | distill s/step | "
        "to first step (s) | evaluate peak RSS (GB) | evaluate (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['n']} | {r['synthetic_gb']:.2f} | {r['synthesize']['seconds']:.0f} | "
            f"{r['distill']['peak_rss_gb']:.2f} | "
            f"{r['sec_per_step']:.3f} | {r['seconds_to_first_step']:.1f} | {r['evaluate']['peak_rss_gb']:.2f} | "
            f"{r['evaluate']['seconds']:.0f} |"
        )
    distill_ratio = rows[-1]["distill"]["peak_rss_gb"] / first["distill"]["peak_rss_gb"]
    evaluate_ratio = rows[-1]["evaluate"]["peak_rss_gb"] / first["evaluate"]["peak_rss_gb"]
    print(f"\npeak RSS at N={sizes[-1]} over N={sizes[0]}: distill {distill_ratio:.3f}, evaluate {evaluate_ratio:.3f}")
    print(
        f"synthesize at N={sizes[0]}: bare teacher work (load, encode, sample; nothing stored) {bare:.1f} s, the stage "
        f"{synth:.1f} s, each a process from its start: throughput ratio {bare / synth:.2f}"
    )
    print(
        f"records table of {million['records']:,} records: {million['table_mb']:.0f} MB on disk, loads whole in "
        f"{million['load_whole_s']:.1f} s, distill's columns in {million['load_distill_columns_s']:.2f} s "
        f"({million['distill_columns_mb']:.0f} MB in memory); manifest {million['manifest_kb']:.0f} KB"
    )
    out = {
        "machine": describe(),
        "rows": rows,
        "million_records": million,
        "distill_rss_ratio": distill_ratio,
        "evaluate_rss_ratio": evaluate_ratio,
        "bare_sampling_seconds": bare,
    }
    if old is not None:
        ratio = old["sec_per_step"] / first["sec_per_step"]
        print(
            f"distill at N={sizes[0]}: {first['sec_per_step']:.4f} s/step here, {old['sec_per_step']:.4f} s/step with "
            f"{args.against}: steps/s ratio (here / there) {ratio:.3f}; peak RSS {first['distill']['peak_rss_gb']:.2f} "
            f"against {old['distill']['peak_rss_gb']:.2f} GB"
        )
        out["against"] = {
            "path": str(args.against),
            **{k: old[k] for k in ("sec_per_step", "distill", "synthesize")},
            "steps_per_second_ratio": ratio,
        }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"peak_rss_ratio {max(distill_ratio, evaluate_ratio):.3f}")
    return out


if __name__ == "__main__":
    main()
