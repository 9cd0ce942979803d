"""Reading the synthetic data set that `ladd synthesize` writes (its layout is documented there): teacher
latents by resolution bucket, their records, and the teacher's path states. Read by distill and by the
synthetic data's validation suite."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load

from ladd.errors import StaleInput, ValidationFailed
from ladd.pipeline import native_resolution


def bucket_resolutions(cfg, teacher_dir: str | Path) -> list[tuple[int, int]]:
    """The (H, W) buckets a SynthesizeConfig asks for: `resolutions`, else the teacher's native size."""
    return [tuple(r) for r in cfg.resolutions] if cfg.resolutions else [native_resolution(teacher_dir)]


def synthesis_settings(cfg, resolutions: list[tuple[int, int]]) -> dict:
    """The `synthesize` settings a data set was made with, as its manifest stores them under `run` (beside the
    teacher's and the prompts' fingerprints); `cfg` is a SynthesizeConfig, `resolutions` its resolved buckets."""
    run = {k: v for k, v in asdict(cfg).items() if k not in ("out_dir", "device", "batch_size")}
    return json.loads(json.dumps({**run, "resolutions": [list(r) for r in resolutions]}))


def check_settings(out_dir: str | Path, settings: dict) -> None:
    """StaleInput (exit 4) when the data set in `out_dir` was made with other `synthesize` settings than these
    (params.yaml edited, synthesize not rerun): training on it would silently use the old ones."""
    manifest_path = Path(out_dir) / "manifest.json"
    if not manifest_path.is_file():
        return  # load_synthetic names what is missing
    made = json.loads(manifest_path.read_text())["run"]
    changed = [f"{k}: {made.get(k)} -> {v}" for k, v in settings.items() if made.get(k) != v]
    if changed:
        raise StaleInput(f"{out_dir} was made with other synthesize settings than params.yaml's ({'; '.join(changed)}): "
                         "run `ladd synthesize` first")


def shard_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shard_fingerprint(path: Path) -> str | None:
    """The run fingerprint a shard was written under (None for a torn or foreign file)."""
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("run")
    except Exception:  # a torn or foreign file: regenerate it
        return None


@dataclass
class Bucket:
    """The records of one resolution: their indices into `Synthetic.records`, teacher latents x0
    [n, C, h, w], (when synthesized) the teacher's path states [n, K, C, h, w] and (inpainting) the condition
    [n, 1 + C, h, w] the teacher sampled under."""

    resolution: tuple[int, int]
    records: torch.Tensor
    latents: torch.Tensor
    trajectory: torch.Tensor | None
    condition: torch.Tensor | None = None


@dataclass
class Synthetic:
    """Teacher samples by resolution bucket, their records, and the times of the stored path states."""

    records: pd.DataFrame
    buckets: list[Bucket]
    trajectory_times: list[float]

    def _only_bucket(self) -> Bucket:
        if len(self.buckets) != 1:
            raise ValueError(f"the synthetic data holds {len(self.buckets)} resolution buckets: read .buckets")
        return self.buckets[0]

    @property
    def latents(self) -> torch.Tensor:
        """[N, C, h, w] in record order (single-resolution data)."""
        return self._only_bucket().latents

    @property
    def trajectory(self) -> torch.Tensor | None:
        return self._only_bucket().trajectory


def load_synthetic(out_dir: str | Path) -> Synthetic:
    """The synthetic data set; fails clearly (naming the file) on an unfinished, damaged or mixed directory."""

    out = Path(out_dir)
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} is missing: run (or finish) `ladd synthesize` first")
    manifest = json.loads(manifest_path.read_text())
    for name in ["records.parquet", *manifest["shard_files"]]:
        if not (out / name).is_file():
            raise FileNotFoundError(f"{out / name} is missing (listed in {manifest_path}): rerun `ladd synthesize`")
    run_fp = json.dumps(manifest["run"], sort_keys=True)
    data = {name: (out / name).read_bytes() for name in manifest["shard_files"]}  # each shard read once
    changed = [name for name, digest in zip(manifest["shard_files"], manifest.get("shard_sha256", []))
               if hashlib.sha256(data[name]).hexdigest() != digest]
    if changed:
        raise ValidationFailed(f"{out}: the content of {', '.join(changed)} no longer matches its sha256 in "
                               f"{manifest_path} (changed after synthesize wrote it): delete "
                               f"{'it' if len(changed) == 1 else 'them'} and rerun `ladd synthesize`")
    foreign = [name for name in manifest["shard_files"] if shard_fingerprint(out / name) != run_fp]
    if foreign:
        raise ValidationFailed(f"{out}: {', '.join(foreign)} {'was' if len(foreign) == 1 else 'were'} not written "
                               f"by the run {manifest_path} describes (other settings, or not readable): rerun "
                               "`ladd synthesize`")
    records = pd.read_parquet(out / "records.parquet")
    times = manifest.get("trajectory_times", [])
    shards = [(b, load(data.pop(name))) for name, b in zip(manifest["shard_files"], manifest["shard_buckets"])]
    buckets = []
    for b, spec in enumerate(manifest["buckets"]):
        mine = [s for sb, s in shards if sb == b]
        latents = torch.cat([s["latents"] for s in mine])
        if list(latents.shape[1:]) != spec["latent_shape"]:
            raise ValidationFailed(f"{out}: bucket {spec['resolution']} holds latents {list(latents.shape[1:])}, "
                                   f"{manifest_path} says {spec['latent_shape']}")
        buckets.append(Bucket(tuple(spec["resolution"]), torch.cat([s["record"] for s in mine]), latents,
                              torch.cat([s["trajectory"] for s in mine]) if times else None,
                              torch.cat([s["condition"] for s in mine]) if "condition" in mine[0] else None))
    if sum(len(b.latents) for b in buckets) != len(records):
        raise ValidationFailed(f"{out}: {sum(len(b.latents) for b in buckets)} latents but {len(records)} records "
                               f"in {out / 'records.parquet'}")
    return Synthetic(records, buckets, times)


def check_finite(data: Synthetic, out_dir: str | Path) -> None:
    """ValidationFailed naming the records and shards whose latents or path states are not finite (training on
    them would silently skip or poison updates)."""

    bad = []
    for b in data.buckets:
        rows = ~torch.isfinite(b.latents.flatten(1)).all(1)
        if b.trajectory is not None:
            rows |= ~torch.isfinite(b.trajectory.flatten(1)).all(1)
        bad += b.records[rows].tolist()
    if bad:
        records = data.records.iloc[bad[:5]]
        named = ", ".join(f"{r.id}#{r.sample} (shard-{r.shard:05d})" for r in records.itertuples())
        raise ValidationFailed(f"{out_dir}: {len(bad)} synthetic latents are not finite, e.g. records {named}: "
                               "rerun `ladd synthesize` (delete those shards)")
