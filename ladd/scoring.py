"""The scoring table of `ladd evaluate`: rows (a model at a step count, CFG and sampler) x figures (FD against the
real images, FD against the many-step teachers' samples, accuracy, precision/recall, CLIP score, the align reward,
the inpainting `outside_mse`, ms per image), each the mean over `evaluate.seeds` with its spread.

A row samples the held-out prompts batch by batch at every resolution bucket and seed, keeps only what it scores
(features, logits, per-image figures, the first seed's grid images) and scores them on rank 0. The teachers' rows
also keep their features: the `fd_<role>` figures of every later row measure against them. Nothing here writes a
file or talks to a tracker: `ladd.evaluate` does, with what the table returns."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ladd.align import generate_batch
from ladd.distributed import World
from ladd.generate import record_noise
from ladd.inpaint import inpaint_condition, record_masks
from ladd.metrics import frechet_distance
from ladd.pipeline import decode_latents, encode_prompts, load_pipeline, max_sequence_length
from ladd.quality import embed, score_features

log = logging.getLogger(__name__)

HEADLINE = (
    "fd",
    "fd_teacher",
    "fd_teacher_same_noise",
    "fd_reference",
    "fd_reference_same_noise",
    "clip_score",
    "accuracy",
    "reward",
    "outside_mse",
)  # the figures rows are named by, where they exist
FIGURES = ("feats", "logits", "clip_score", "reward", "outside_mse", "grid")  # what a row keeps of a batch


def summarize_seeds(rows: list[dict]) -> dict:
    """Per-seed figures -> their mean under the plain name, the spread (std over seeds, ddof 1) as
    `<name>_std`, and the per-seed values under `per_seed`."""
    out: dict = {}
    for key in rows[0]:
        values = np.array([r[key] for r in rows], dtype=float)
        out[key] = float(values.mean())
        out[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    out["per_seed"] = rows
    return out


class Model:
    """One model to evaluate: a transformer (the pipeline's, unless given) with the VAE and text encoders of `pipe`."""

    def __init__(self, pipe, msl: int, transformer=None):
        self.pipe, self.msl = pipe, msl
        self.transformer = pipe.transformer if transformer is None else transformer
        self.null_e, self.null_p = encode_prompts(pipe, [""], msl)

    @classmethod
    def load(cls, pipe_dir, device) -> Model:
        return cls(load_pipeline(pipe_dir, device), max_sequence_length(pipe_dir))

    def encode(self, prompts: list[str]):
        return encode_prompts(self.pipe, prompts, self.msl)

    def sample(self, start, embeds, pooled, noise, sigmas, guidance, sampler, batch_size, seed, condition=None):
        """Images (on the CPU) of the batch of rows [start, start + len(noise)), as when sampled among all rows."""
        lat = generate_batch(
            self.transformer,
            start,
            embeds,
            pooled,
            noise,
            sigmas,
            batch_size,
            condition,
            guidance=guidance,
            null_embeds=self.null_e,
            null_pooled=self.null_p,
            sampler=sampler,
            seed=seed,
        )
        return decode_latents(self.pipe.vae, lat, batch_size).cpu()


@dataclass
class ScoringTable:
    """What every row is scored on: the held-out `prompts` (their `labels`; `images` uint8 where the split has them,
    inpainted under `mask_seed`'s masks when set), the resolution `buckets` (pixel size, share) with their latent
    `shapes`, the FD `extractor` (and `clip`, and the align `reward`), and `real`: the real images' features, or
    None. `references[role][(bucket, seed)]`: the features fd_<role> measures against."""

    world: World
    prompts: list[str]
    labels: Any  # numpy int labels (-1: none), as the split holds them
    images: torch.Tensor | None
    seeds: tuple[int, ...]
    batch_size: int
    grid_n: int
    buckets: list[tuple[tuple[int, int], float]]
    shapes: list[tuple[int, ...]]
    extractor: Any  # ladd.quality's extractors and scorers: duck-typed
    clip: Any | None
    reward: Any | None
    reward_labels: list | None
    real: torch.Tensor | None
    mask_seed: int | None  # inpainting: every model inpaints held-out image i under record i's mask
    references: dict[str, dict] = field(default_factory=dict)

    def row(self, model: Model, steps: int, sigmas, guidance: float, sampler: str, name: str, role=None, solo=False):
        """The row of one sampler configuration: every seed at every bucket sampled and scored, and its first seed's
        images at the first bucket; `role`: teacher or reference, whose features fd_<role> measures against. With
        several buckets, each figure is the share-weighted mean over them, seed by seed, and the row keeps each
        bucket's own under `buckets`. `solo`: sampled by this process alone (the champion's re-scoring, rank 0).
        ({}, None) on ranks other than the main one."""
        on = replace(self.world, rank=0, size=1) if solo else self.world
        if role is not None:
            self.references[role] = {}
        per_bucket, first = [], None
        for b in range(len(self.buckets)):
            per_seed, grid = self._bucket_rows(model, b, sigmas, guidance, sampler, role, on)
            per_bucket.append(per_seed)
            first = grid if first is None else first
        if not on.main:
            return {}, None
        shares = np.array([s for _, s in self.buckets]) / sum(s for _, s in self.buckets)
        mixed = [
            {k: float(sum(w * rows[i][k] for w, rows in zip(shares, per_bucket))) for k in per_bucket[0][i]}
            for i in range(len(self.seeds))
        ]
        row = {
            "steps": steps,
            "guidance": guidance,
            "nfe": steps * (2 if guidance > 1 else 1),
            **summarize_seeds(mixed),
        }
        if len(self.buckets) > 1:
            row["buckets"] = {f"{h}x{w}": summarize_seeds(rows) for ((h, w), _), rows in zip(self.buckets, per_bucket)}
        log.info(
            "%s: %s (%d seeds)",
            name,
            ", ".join(f"{k} {row[k]:.3f} ± {row[f'{k}_std']:.3f}" for k in HEADLINE if k in row),
            len(self.seeds),
        )
        return row, first

    def _bucket_rows(self, model: Model, b: int, sigmas, guidance, sampler, role, on: World):
        """Every seed of one configuration sampled at bucket `b` and scored: (per-seed figures, the first seed's
        grid images); ([], None) on ranks other than the main one."""
        shape, n, batch_size, seeds = self.shapes[b], len(self.prompts), self.batch_size, list(self.seeds)
        kept: dict = {seed: {} for seed in seeds}  # seed -> figure -> this rank's per-batch tensors, in batch order
        seconds, sampled = dict.fromkeys(seeds, 0.0), 0
        for start in range(on.rank * batch_size, n, on.size * batch_size):
            rows = range(start, min(start + batch_size, n))
            batch = self.prompts[start : rows.stop]
            embeds, pooled = model.encode(batch)  # once for every seed; not timed (ms_per_image is the sampler's)
            text = self.clip.text_embeds(batch) if self.clip is not None else None
            condition = None
            if self.mask_seed is not None:
                held: Any = self.images  # inpainting: the held-out images, checked to exist
                masks = record_masks("evaluate", rows, self.mask_seed, *held.shape[-2:])
                condition = inpaint_condition(model.pipe.vae, held[start : rows.stop], masks)
                outside, original = (masks < 0.5).float(), held[start : rows.stop].float() / 255
            for seed in seeds:
                # record i of seed s starts from seed s * 1_000_003 + i: the seeds' noises never overlap
                noise = record_noise([seed * 1_000_003 + i for i in rows], shape)
                tick = time.perf_counter()
                images = model.sample(
                    start, embeds, pooled, noise, sigmas, guidance, sampler, batch_size, seed, condition
                )
                seconds[seed] += time.perf_counter() - tick
                got: dict[str, Any] = dict(zip(("feats", "logits"), embed(self.extractor, images)))
                if self.clip is not None:  # per image; clip_score is their mean
                    got["clip_score"] = (100 * (self.clip.image_embeds(images) * text).sum(-1)).clamp(min=0)
                if self.reward is not None:
                    labels = None if self.reward_labels is None else self.reward_labels[start : rows.stop]
                    got["reward"] = self.reward(images, batch, labels)
                if self.mask_seed is not None:  # what had to stay: the real image outside the mask
                    error = (images.float() - original).pow(2) * outside
                    got["outside_mse"] = error.sum((1, 2, 3)) / (outside.sum((1, 2, 3)) * images.shape[1])
                if seed == seeds[0] and (start == 0 or start < self.grid_n):  # rank 0 always has one (grid_n may be 0)
                    got["grid"] = images[: self.grid_n - start]
                for k, v in got.items():
                    if v is not None:
                        kept[seed].setdefault(k, []).append(v.float())
            sampled += len(rows)
        per_seed, first, seed_feats = [], None, {}
        for seed in seeds:
            # every rank joins each gather, even one with no batch (rank 0 has batch 0: it holds every figure there is)
            got = {
                k: on.gather_batches(
                    torch.cat(kept[seed][k]) if k in kept[seed] else torch.empty(0),
                    self.grid_n if k == "grid" else n,
                    batch_size,
                )
                for k in FIGURES
            }
            if not on.main:
                continue
            got = {k: v for k, v in got.items() if k in kept[seed]}
            seed_feats[seed] = got["feats"]
            row = {
                "ms_per_image": seconds[seed] * 1000 / max(sampled, 1),
                **score_features(got["feats"], got.get("logits"), self.labels, self.real),
            }
            row.update({k: float(got[k].mean()) for k in ("clip_score", "reward", "outside_mse") if k in got})
            per_seed.append(row)
            first = got["grid"] if first is None else first
        if not on.main:
            return [], None
        if role is not None:
            self.references[role].update({(b, seed): f for seed, f in seed_feats.items()})
        for name, feats_of in self.references.items():
            for i, (seed, r) in enumerate(zip(seeds, per_seed)):
                if name != role:  # against the same noise: also rewards following that teacher's ODE path
                    r[f"fd_{name}_same_noise"] = frechet_distance(feats_of[(b, seed)].numpy(), seed_feats[seed].numpy())
                if (
                    len(seeds) > 1
                ):  # against the next seed's samples (other noise, same prompts); its own row: the floor
                    other = feats_of[(b, seeds[(i + 1) % len(seeds)])]
                    r[f"fd_{name}"] = frechet_distance(other.numpy(), seed_feats[seed].numpy())
        return per_seed, first
