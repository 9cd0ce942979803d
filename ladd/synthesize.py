"""`ladd synthesize`: teacher latents with CFG for every training prompt (LADD sec. 3.2: the student
trains on teacher samples only), written as sharded safetensors plus a manifest.

    <out>/shard-00000.safetensors  latents [n, C, h, w], record [n], trajectory [n, K, C, h, w], condition
                                   [n, 1 + C, h, w] (inpainting); metadata: run fingerprint; every shard holds one
                                   resolution bucket
    <out>/embeds-00000.safetensors prompt_embeds [m, L, D], pooled_prompt_embeds [m, P]: the teacher's text
                                   embeddings of `shard_size` distinct prompts in first-seen order, computed once; the
                                   teacher samples from these rows and distill reads them, so it needs no text encoder
    <out>/records.parquet          id, prompt, label, sample, seed, bucket, shard, row, prompt_index, a CRC-32 per
                                   stored row (crc_latents, crc_trajectory, ..., crc_prompt_embeds) (inpainting: image)
    <out>/manifest.json            run settings and fingerprints, buckets, shard and embedding files with their
                                   byte sizes, the text embeddings' shapes and T5 length

Each shard also holds its rows' CRC-32s (`crc_<tensor>`, computed before writing), from which the records table
is assembled without reading the data back.

Floating-point tensors are stored as `storage_dtype` (auto: bfloat16 when the teacher runs on CUDA, whose
distill computes in bf16 anyway; float32 on the CPU): bf16 halves the disk and the reads.

Multi-aspect training (SD3-Turbo trains this way): each record is assigned to one of
`resolutions` by a weighted draw from the seed, the same for a record whatever the data set's size.

`trajectory` holds the teacher's own states at `trajectory_times` on the same CFG Euler path that ends
at `latents` (the student's times below 1): sharp (x_t, x0) pairs for trajectory distillation.

Inpainting (`inpaint.enabled`): record i inpaints its training image under its seeded mask (`record_masks`,
stream "synthesize"); the condition (mask and masked-image latent) is stored beside the teacher's latents.

Record i's noise comes from seed + i, so a rerun is bit-identical. The work happens in `<out>.next/`:
finished shards of `<out>` with the same settings are hard-linked there, the missing ones generated (each
written atomically), the manifest written and the suite run; only then does it replace `<out>`. So a kill,
a full disk or a failing suite leaves the previous data set whole, and the same command resumes.

Under torchrun each rank generates every world-size-th missing shard; rank 0 then writes the manifest, runs the
suite and swaps. Which shards are missing is read from disk, so a resumed run skips finished shards whatever
the number of processes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ladd.config import InpaintConfig, SynthesizeConfig
from ladd.data.prepare import load_split
from ladd.data.synthetic import (
    PROMPT_TENSORS,
    RECORD_TENSORS,
    STORAGE_DTYPES,
    ShardFile,
    bucket_resolutions,
    gather_rows,
    row_checksums,
    shard_fingerprint,
    synthesis_settings,
)
from ladd.distributed import close_world, init_world
from ladd.errors import ConfigError
from ladd.generate import generate_latents, record_noise
from ladd.inpaint import check_task, inpaint_condition, record_masks
from ladd.io import atomic_file, fingerprint, replace_dir, restore_interrupted_swap, save_tensors, write_json
from ladd.pipeline import bucket_latent_shapes, encode_prompts, load_pipeline, max_sequence_length
from ladd.sampling import flow_sigmas

log = logging.getLogger(__name__)


def synthetic_records(captions: pd.DataFrame, samples_per_prompt: int, seed: int) -> pd.DataFrame:
    reps = captions.loc[captions.index.repeat(samples_per_prompt)].reset_index(drop=True)
    reps["sample"] = list(range(samples_per_prompt)) * len(captions)
    reps["seed"] = seed + reps.index
    return reps


def assign_buckets(n: int, weights, seed: int) -> np.ndarray:
    """Bucket index of each of n records: a weighted draw from one stream per seed, so record i keeps its
    bucket when records are added after it."""
    if len(weights) == 1:
        return np.zeros(n, dtype=np.int64)
    u = np.random.default_rng([seed, 1]).random(n)
    cum = np.cumsum(weights) / np.sum(weights)
    return np.minimum(np.searchsorted(cum, u, side="right"), len(weights) - 1)


def plan_shards(buckets: np.ndarray, shard_size: int) -> list[tuple[int, int, np.ndarray]]:
    """(shard index, bucket, record indices): each bucket's records in order, cut into shards."""
    shards = []
    for b in range(int(buckets.max()) + 1 if len(buckets) else 0):
        rows = np.flatnonzero(buckets == b)
        shards += [
            (len(shards) + j, b, rows[s : s + shard_size]) for j, s in enumerate(range(0, len(rows), shard_size))
        ]
    return shards


def _stage_dir(out: Path, run: dict, run_fp: str) -> Path:
    """`<out>.next/` holding every finished shard of these settings: those of an interrupted run kept, those of
    `<out>` hard-linked (no copy, and `<out>` stays as it is)."""
    restore_interrupted_swap(out)
    work = out.with_name(out.name + ".next")
    run_file = work / "run.json"
    for torn in work.glob(".*.tmp"):  # a shard being written when the last run was killed
        torn.unlink()
    if work.is_dir() and (not run_file.is_file() or json.loads(run_file.read_text()) != run):
        log.info("synthesize: %s holds work for other settings; starting it over", work)
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_json(run_file, run)
    for shard in sorted([*out.glob("shard-*.safetensors"), *out.glob("embeds-*.safetensors")]):
        target = work / shard.name
        if not target.exists() and shard_fingerprint(shard) == run_fp:
            try:
                os.link(shard, target)
            except OSError:  # a file system without hard links
                shutil.copy2(shard, target)
    return work


def synthesize(
    cfg: SynthesizeConfig,
    data_dir: str | Path,
    teacher_dir: str | Path,
    tracker,
    check: Callable[[Path], dict] | None = None,
    inpaint: InpaintConfig | None = None,
) -> dict:
    """Generate (or finish) the synthetic data set; `check(dir)`, the synthetic suite, runs on the finished
    set before it replaces `cfg.out_dir`. With `inpaint.enabled`, the teacher inpaints the training images."""
    world = init_world(cfg.device)
    try:
        return _synthesize(cfg, data_dir, teacher_dir, tracker, check, world, inpaint)
    finally:
        close_world(world)


def _inpainting_images(images, data_dir, resolutions) -> torch.Tensor:
    """The training images the teacher inpaints, checked before any work: one bucket at their own resolution (the
    masked image fixes the size)."""
    if images is None:
        raise ConfigError(f"inpaint.enabled: {data_dir}/train has no images to inpaint (prompts only)")
    size = tuple(images.shape[-2:])
    if len(resolutions) != 1 or tuple(resolutions[0]) != size:
        raise ConfigError(
            f"synthesize.resolutions: inpainting works at the images' own size {list(size)}, got "
            f"{[list(r) for r in resolutions]}: set it to [{list(size)}] (or leave it empty)"
        )
    return images


def storage_dtype(name: str, device: torch.device) -> torch.dtype:
    """synthesize.storage_dtype resolved: auto is bfloat16 on CUDA (distill's bf16 autocast reads no more than that)
    and float32 on the CPU (where distill computes in fp32)."""
    return STORAGE_DTYPES[("bfloat16" if device.type == "cuda" else "float32") if name == "auto" else name]


EMBED_SHARD_BYTES = 256 * 2**20


def embed_shard_size(null_e: torch.Tensor, null_p: torch.Tensor, dtype: torch.dtype, shard_size: int) -> int:
    """Prompts per embedding shard: `shard_size`, fewer where their embeddings would pass EMBED_SHARD_BYTES."""
    per_prompt = (null_e[0].numel() + null_p[0].numel()) * torch.empty(0, dtype=dtype).element_size()
    return max(1, min(shard_size, EMBED_SHARD_BYTES // per_prompt))


def read_prompt_rows(work: Path, prompt_index: np.ndarray, per_shard: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled) of these prompts, read from the embedding shards (the rows the teacher samples from
    and distill reads: one source of truth for both)."""
    opened: dict[int, ShardFile] = {}

    def shard_of(f: int) -> ShardFile:
        if f not in opened:
            opened[f] = ShardFile(work / f"embeds-{f:05d}.safetensors")
        return opened[f]

    try:
        rows = gather_rows(shard_of, prompt_index // per_shard, prompt_index % per_shard, list(PROMPT_TENSORS))
    finally:
        for shard in opened.values():
            shard.close()
    return tuple(rows[n] for n in PROMPT_TENSORS)


def _synthesize(cfg: SynthesizeConfig, data_dir, teacher_dir, tracker, check, world, inpaint=None) -> dict:
    out, device = Path(cfg.out_dir), world.device
    resolutions = bucket_resolutions(cfg, teacher_dir)
    shapes = bucket_latent_shapes(teacher_dir, resolutions, "synthesize.resolutions")  # before any work
    weights = list(cfg.resolution_weights or [1.0] * len(resolutions))
    conditioned = inpaint is not None and inpaint.enabled
    check_task(teacher_dir, conditioned)
    train = load_split(Path(data_dir) / "train")
    images = _inpainting_images(train.images, data_dir, resolutions) if conditioned else None
    captions = train.captions
    records = synthetic_records(captions, cfg.samples_per_prompt, cfg.seed)
    records["bucket"] = assign_buckets(len(records), weights, cfg.seed)
    codes, prompts = pd.factorize(records["prompt"])  # distinct prompts in first-seen order
    records["prompt_index"] = codes.astype(np.int64)
    dtype = storage_dtype(cfg.storage_dtype, device)
    run = {
        **synthesis_settings(cfg, resolutions),
        "stored_dtype": str(dtype).removeprefix("torch."),
        "teacher": fingerprint(teacher_dir),
        "prompts": fingerprint(Path(data_dir) / "train" / "captions.parquet"),
    }
    if images is not None:
        records["image"] = np.repeat(np.arange(len(captions)), cfg.samples_per_prompt)
        run["inpaint"] = {
            "mask_seed": inpaint.mask_seed,
            "images": fingerprint(Path(data_dir) / "train" / "images.safetensors"),
        }
    run_fp = json.dumps(run, sort_keys=True)
    shards = plan_shards(records["bucket"].to_numpy(), cfg.shard_size)
    pipe = load_pipeline(teacher_dir, device)
    msl = max_sequence_length(teacher_dir)
    null_e, null_p = encode_prompts(pipe, [""], msl)
    # an embedding shard is written whole: at most EMBED_SHARD_BYTES (SD3.5: 2.7 MB a prompt in bf16, 93 a shard)
    per_embed_shard = embed_shard_size(null_e, null_p, dtype, cfg.shard_size)
    embed_shards = [
        (k, np.arange(s, min(s + per_embed_shard, len(prompts))))
        for k, s in enumerate(range(0, len(prompts), per_embed_shard))
    ]
    work = out.with_name(out.name + ".next")
    missing = None
    if world.main:  # rank 0 stages the folder and lists the missing shards, before any rank writes one
        _stage_dir(out, run, run_fp)
        missing = [
            f"embeds-{k:05d}"
            for k, _ in embed_shards
            if shard_fingerprint(work / f"embeds-{k:05d}.safetensors") != run_fp
        ]
        missing += [
            f"shard-{k:05d}" for k, _, _ in shards if shard_fingerprint(work / f"shard-{k:05d}.safetensors") != run_fp
        ]
    missing = set(world.broadcast(missing))
    todo = [(k, b, rows) for k, b, rows in shards if f"shard-{k:05d}" in missing]
    embeds_todo = [(k, rows) for k, rows in embed_shards if f"embeds-{k:05d}" in missing]

    sigmas = flow_sigmas(cfg.steps, pipe.scheduler.config.shift)
    log.info(
        "synthesize: %d records of %d prompts in %d shards over %d resolution buckets %s, %d shards to generate "
        "and %d of %d of text embeddings (%d steps, CFG %.1f, stored as %s) on %d processes",
        len(records),
        len(prompts),
        len(shards),
        len(resolutions),
        resolutions,
        len(todo),
        len(embeds_todo),
        len(embed_shards),
        cfg.steps,
        cfg.guidance,
        dtype,
        world.size,
    )
    # 1. The text embeddings, once per distinct prompt; the stored rows are what the teacher samples from below
    for k, rows in tqdm(
        embeds_todo[world.rank :: world.size], desc="synthesize: text", unit="shard", disable=not world.main
    ):
        embeds = torch.empty(len(rows), *null_e.shape[1:], dtype=dtype)  # filled a batch at a time
        pooled = torch.empty(len(rows), *null_p.shape[1:], dtype=dtype)
        for i in range(0, len(rows), cfg.batch_size):
            e, p = encode_prompts(pipe, list(prompts[rows[i : i + cfg.batch_size]]), msl, batch_size=cfg.batch_size)
            embeds[i : i + len(e)], pooled[i : i + len(e)] = e.to(dtype).cpu(), p.to(dtype).cpu()
        save_shard(
            work / f"embeds-{k:05d}.safetensors",
            {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled},
            dtype,
            run_fp,
        )
    world.barrier()  # every embedding shard written before any rank reads one
    # 2. The teacher's latents (and path states, and the inpainting condition) per shard
    mine = todo[world.rank :: world.size]
    with tqdm(total=sum(len(r) for *_, r in mine), desc="synthesize", unit="latent", disable=not world.main) as bar:
        for k, b, rows in mine:
            parts = []
            for i in range(0, len(rows), cfg.batch_size):  # a batch's embeddings in memory at a time
                chunk = records.iloc[rows[i : i + cfg.batch_size]]
                embeds, pooled = read_prompt_rows(work, chunk["prompt_index"].to_numpy(), per_embed_shard)
                part = {}
                if images is not None:
                    masks = record_masks("synthesize", chunk["seed"], inpaint.mask_seed, *images.shape[-2:])
                    part["condition"] = inpaint_condition(pipe.vae, images[chunk["image"].to_numpy()], masks)
                generated = generate_latents(
                    pipe.transformer,
                    embeds,
                    pooled,
                    record_noise(list(chunk["seed"]), shapes[b]),
                    sigmas,
                    cfg.guidance,
                    null_e,
                    null_p,
                    batch_size=cfg.batch_size,
                    path_times=cfg.trajectory_times,
                    condition=part.get("condition"),
                )
                if cfg.trajectory_times:
                    part["latents"], part["trajectory"] = generated
                else:
                    part["latents"] = generated
                parts.append(part)
            tensors = {"record": torch.from_numpy(rows), **{n: torch.cat([q[n] for q in parts]) for n in parts[0]}}
            save_shard(work / f"shard-{k:05d}.safetensors", tensors, dtype, run_fp)
            bar.update(len(rows))
    world.barrier()  # every shard written
    summary = {
        "records": len(records),
        "shards": len(shards),
        "generated_shards": len(todo),
        "buckets": len(resolutions),
        "prompts": len(prompts),
    }
    if not world.main:
        return summary
    names = [f"embeds-{k:05d}" for k, _ in embed_shards] + [f"shard-{k:05d}" for k, _, _ in shards]
    unfinished = [n for n in names if shard_fingerprint(work / f"{n}.safetensors") != run_fp]
    if unfinished:  # a rank that ended without an error but did not write its share
        raise RuntimeError(f"{work}: {unfinished} were not written; run `ladd synthesize` again")
    stored = _record_checksums(work, records, shards, embed_shards)
    with atomic_file(work / "records.parquet") as tmp:
        records.to_parquet(tmp, index=False)
    counts = np.bincount(records["bucket"], minlength=len(resolutions))
    buckets = [
        {"resolution": list(r), "latent_shape": list(shape), "weight": w, "records": int(n)}
        for r, shape, w, n in zip(resolutions, shapes, weights, counts)
    ]
    shard_files = [f"shard-{k:05d}.safetensors" for k, _, _ in shards]
    embed_files = [f"embeds-{k:05d}.safetensors" for k, _ in embed_shards]
    first = ShardFile(work / embed_files[0])
    text = {
        "max_sequence_length": msl,
        "prompt_embeds": first.specs["prompt_embeds"]["shape"][1:],
        "pooled_prompt_embeds": first.specs["pooled_prompt_embeds"]["shape"][1:],
    }
    first.close()
    # content only (no counts of this run's work): rerunning with nothing to do rewrites the same file
    write_json(
        work / "manifest.json",
        {
            "run": run,
            "buckets": buckets,
            "trajectory_times": list(cfg.trajectory_times),
            "records": len(records),
            "record_tensors": stored,
            "shard_files": shard_files,
            "shard_buckets": [b for _, b, _ in shards],
            "shard_bytes": [(work / f).stat().st_size for f in shard_files],
            "embed_files": embed_files,
            "embed_shard_size": per_embed_shard,
            "prompts": len(prompts),
            "text": text,
            "embed_bytes": [(work / f).stat().st_size for f in embed_files],
        },
    )
    if check is not None:
        summary |= check(work)  # a failing suite raises here: `<out>` is untouched, the work kept for a look
    replace_dir(work, out)
    (out / "run.json").unlink()  # after the swap: a kill before it leaves `.next` resumable
    tracker.log_metrics({"synthesize/records": len(records), "synthesize/generated_shards": len(todo)})
    return summary


def save_shard(path: Path, tensors: dict, dtype: torch.dtype, run_fp: str) -> None:
    """Write a shard atomically: floating tensors as `dtype`, in its header the run it belongs to, and beside each
    tensor but `record` its rows' CRC-32s `crc_<name>` (what the records table is assembled from, and distill checks
    rows by)."""
    tensors = {name: (t.to(dtype) if t.is_floating_point() else t).cpu().contiguous() for name, t in tensors.items()}
    # as tensors, not header metadata: safetensors writes a header's metadata keys in no fixed order, and a rerun
    # must write the same bytes
    sums = {
        f"crc_{name}": torch.tensor(row_checksums(t), dtype=torch.int64)
        for name, t in tensors.items()
        if name != "record"
    }
    with atomic_file(path) as tmp:
        save_tensors({**tensors, **sums}, tmp, metadata={"run": run_fp})


def _record_checksums(work: Path, records: pd.DataFrame, shards, embed_shards) -> list[str]:
    """Each record's shard and row, and each stored row's CRC-32 from its shard's `crc_` tensors (nothing else read),
    into `records`; the names of the record tensors stored."""
    stored: list[str] = []
    for k, _, rows in shards:
        shard = ShardFile(work / f"shard-{k:05d}.safetensors")
        records.loc[rows, "shard"], records.loc[rows, "row"] = k, np.arange(len(rows))
        stored = [n for n in RECORD_TENSORS if shard.has(n)]
        for name in stored:
            records.loc[rows, f"crc_{name}"] = shard.read_rows(f"crc_{name}", np.arange(len(rows)))[0].numpy()
        shard.close()
    prompt_crc = {n: np.zeros(int(records["prompt_index"].max()) + 1, dtype=np.int64) for n in PROMPT_TENSORS}
    for k, rows in embed_shards:
        shard = ShardFile(work / f"embeds-{k:05d}.safetensors")
        for name in PROMPT_TENSORS:
            prompt_crc[name][rows] = shard.read_rows(f"crc_{name}", np.arange(len(rows)))[0].numpy()
        shard.close()
    for name in PROMPT_TENSORS:
        records[f"crc_{name}"] = prompt_crc[name][records["prompt_index"].to_numpy()]
    records[["shard", "row", *(f"crc_{n}" for n in stored)]] = records[
        ["shard", "row", *(f"crc_{n}" for n in stored)]
    ].astype("int64")
    return stored
