"""`ladd synthesize`: teacher latents with CFG for every training prompt (LADD sec. 3.2: the student
trains on teacher samples only), written as sharded safetensors plus a manifest.

    <out>/shard-00000.safetensors  latents [n, C, h, w], record [n], trajectory [n, K, C, h, w]
                                   (metadata: run fingerprint)
    <out>/records.parquet          id, prompt, label, sample, seed, shard, row
    <out>/manifest.json            guidance, steps, seed, trajectory_times, teacher fingerprint, shard_files

`trajectory` holds the teacher's own states at `trajectory_times` on the same CFG Euler path that ends
at `latents` (the student's times below 1): sharp (x_t, x0) pairs for trajectory distillation.

Record i's noise comes from seed + i, so a rerun is bit-identical and resuming after a kill keeps every
finished shard (each written atomically) and generates only the missing ones.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ladd.config import SynthesizeConfig
from ladd.data.prepare import load_split
from ladd.generate import generate_latents, record_noise
from ladd.io import atomic_file, fingerprint, write_json
from ladd.pipeline import encode_prompts, latent_shape, load_pipeline, max_sequence_length, pick_device
from ladd.sampling import flow_sigmas

log = logging.getLogger(__name__)


def synthetic_records(captions: pd.DataFrame, samples_per_prompt: int, seed: int) -> pd.DataFrame:
    reps = captions.loc[captions.index.repeat(samples_per_prompt)].reset_index(drop=True)
    reps["sample"] = list(range(samples_per_prompt)) * len(captions)
    reps["seed"] = seed + reps.index
    return reps


def _shard_fingerprint(path: Path) -> str | None:
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("run")
    except Exception:  # a torn or foreign file: regenerate it
        return None


def synthesize(cfg: SynthesizeConfig, data_dir: str | Path, teacher_dir: str | Path, tracker) -> dict:
    out = Path(cfg.out_dir)
    device = pick_device(cfg.device)
    captions = load_split(Path(data_dir) / "train").captions
    records = synthetic_records(captions, cfg.samples_per_prompt, cfg.seed)
    teacher_fp = fingerprint(teacher_dir)
    run = {k: v for k, v in asdict(cfg).items() if k not in ("out_dir", "device", "batch_size")}
    run.update(teacher=teacher_fp, prompts=fingerprint(Path(data_dir) / "train" / "captions.parquet"))
    run = json.loads(json.dumps(run))  # as stored in the manifest
    run_fp = json.dumps(run, sort_keys=True)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file() and json.loads(manifest_path.read_text()).get("run") != run:
        log.info("synthesize: settings or teacher changed since %s was written; starting over", out)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    pipe = load_pipeline(teacher_dir, device)
    msl = max_sequence_length(teacher_dir)
    null_e, null_p = encode_prompts(pipe, [""], msl)
    sigmas = flow_sigmas(cfg.steps, pipe.scheduler.config.shift)
    shards = [(k, range(s, min(s + cfg.shard_size, len(records)))) for k, s in enumerate(range(0, len(records), cfg.shard_size))]
    todo = [(k, rows) for k, rows in shards if _shard_fingerprint(out / f"shard-{k:05d}.safetensors") != run_fp]
    log.info("synthesize: %d records in %d shards, %d to generate (%d steps, CFG %.1f)",
             len(records), len(shards), len(todo), cfg.steps, cfg.guidance)
    with tqdm(total=sum(len(r) for _, r in todo), desc="synthesize", unit="latent") as bar:
        for k, rows in todo:
            chunk = records.iloc[rows.start : rows.stop]
            embeds, pooled = encode_prompts(pipe, list(chunk["prompt"]), msl)
            noise = record_noise(list(chunk["seed"]), latent_shape(pipe))
            tensors = {"record": torch.arange(rows.start, rows.stop)}
            generated = generate_latents(pipe.transformer, embeds, pooled, noise, sigmas, cfg.guidance, null_e, null_p,
                                         batch_size=cfg.batch_size, path_times=cfg.trajectory_times)
            if cfg.trajectory_times:
                tensors["latents"], tensors["trajectory"] = generated
            else:
                tensors["latents"] = generated
            with atomic_file(out / f"shard-{k:05d}.safetensors") as tmp:
                save_file({name: t.contiguous() for name, t in tensors.items()}, tmp, metadata={"run": run_fp})
            bar.update(len(rows))
    records["shard"] = [r // cfg.shard_size for r in range(len(records))]
    records["row"] = [r % cfg.shard_size for r in range(len(records))]
    with atomic_file(out / "records.parquet") as tmp:
        records.to_parquet(tmp, index=False)
    summary = {"records": len(records), "shards": len(shards), "generated_shards": len(todo)}
    write_json(manifest_path, {"run": run, "shard_files": [f"shard-{k:05d}.safetensors" for k, _ in shards],
                               "trajectory_times": list(cfg.trajectory_times),
                               "latent_shape": list(latent_shape(pipe)), **summary})
    tracker.log_metrics({"synthesize/records": len(records), "synthesize/generated_shards": len(todo)})
    return summary


@dataclass
class Synthetic:
    """Teacher samples in record order: latents x0 [N, C, h, w], their records, and (when synthesized)
    the teacher's path states at `trajectory_times` [N, K, C, h, w]."""

    latents: torch.Tensor
    records: pd.DataFrame
    trajectory: torch.Tensor | None
    trajectory_times: list[float]


def load_synthetic(out_dir: str | Path) -> Synthetic:
    """The synthetic data set; fails clearly on an unfinished directory."""
    out = Path(out_dir)
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} is missing: run (or finish) `ladd synthesize` first")
    manifest = json.loads(manifest_path.read_text())
    shards = [load_file(out / name) for name in manifest["shard_files"]]
    latents = torch.cat([s["latents"] for s in shards])
    times = manifest.get("trajectory_times", [])
    trajectory = torch.cat([s["trajectory"] for s in shards]) if times else None
    records = pd.read_parquet(out / "records.parquet")
    if len(latents) != len(records):
        raise ValueError(f"{out}: {len(latents)} latents but {len(records)} records")
    return Synthetic(latents, records, trajectory, times)
