"""`ladd evaluate`: the quality-vs-steps table on the held-out split `evaluate.split` (val to choose settings, test
to report). The teacher the student was distilled from (its synthetic data's CFG and steps), that teacher sampled
naively at few steps, and the student at few steps (no CFG); same prompts, same per-record noise, same batch size
for the timings. Every row is scored against that teacher's many-step samples on the same prompts: `fd_teacher`
(the field's FID-T; against the samples of another seed, a distance between distributions whose floor is the
teacher's own row) and `fd_teacher_same_noise` (against those of the same noise, which also rewards following the
teacher's ODE path); neither needs real images. With `evaluate.reference_guidance` set to another CFG, the
teacher at that CFG is a row of its own and every row also gets `fd_reference` and `fd_reference_same_noise`
against it. Where the data has real images: `fd`, precision/recall, with the real-vs-real floor; CLIP score
where `evaluate.clip_path` is set; accuracy where the extractor classifies. A student distilled on several
resolution buckets is sampled at each (rows per bucket under `buckets`; the headline figures are the
share-weighted means). With the preference stage on (`align.enabled`), the aligned student is
scored beside the student (rows `aligned`, every row also by the stage's reward), `reports/align.json` holds
the before/after table, and the gate judges and registers the aligned one. Inpainting (`inpaint.enabled`): every model
inpaints test image i under its seeded mask (`record_masks`, stream "evaluate"; the same masks for every seed and
model), FD and accuracy are those of the inpainted images, and `outside_mse` is the mean squared error (pixels in
[0, 1]) to the real image where the mask keeps it; the grid's first row is the masked input. FD on a few hundred
samples moves by points with the noise, so every figure is the mean over `seeds` with its spread (std).

Memory grows with the batch, not with the number of prompts: each batch of `batch_size` rows is encoded, sampled,
decoded and scored in turn, and only its features (and logits, and per-image figures) are kept, with the images
of the grid. Under torchrun each rank samples every world-size-th batch (each exactly as one process samples it);
rank 0 gathers the features, scores them and writes everything."""

from __future__ import annotations

import json
import logging
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ladd.align import REWARDS, generate_batch, load_reward, model_dir
from ladd.card import write_model_card
from ladd.config import EvaluateConfig, resolve_features
from ladd.data.prepare import load_split
from ladd.distributed import World, close_world, init_world
from ladd.errors import ConfigError
from ladd.gate import prompts_fingerprint, resolve_metric
from ladd.generate import record_noise
from ladd.inpaint import check_task, inpaint_condition, masked_images, record_masks
from ladd.io import atomic_file, fingerprint, write_json
from ladd.metrics import frechet_distance
from ladd.pipeline import (
    bucket_latent_shapes,
    decode_latents,
    encode_prompts,
    load_pipeline,
    load_transformer,
    max_sequence_length,
    native_resolution,
    read_meta,
)
from ladd.quality import FEATURE_EXTRACTORS, embed, load_clip, real_floor, score_features
from ladd.registry import open_registry, register_and_gate
from ladd.sampling import flow_sigmas
from ladd.schedules import student_sigmas

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
FIGURES = ("feats", "logits", "clip_score", "reward", "outside_mse", "grid")  # what evaluate keeps of a batch
ROW_KEYS = ("nfe", *(k for m in HEADLINE for k in (m, f"{m}_std")))  # quality_vs_nfe.json's columns
EXTRACTOR_PATH_KEYS = {
    "classifier": "evaluate.features",
    "inception": "evaluate.inception_path",
    "clip": "evaluate.clip_path",
}


def save_grid(
    images: torch.Tensor,
    path: Path,
    ncol: int = 10,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    scale: int = 3,
) -> Path:
    """float [N, C, H, W] in [0, 1] -> one PNG, `ncol` images a row, upscaled `scale`x; with `row_labels`, each
    row is named in a margin on its left; with `col_labels` (the prompts), each column's text sits under it."""
    n, c, h, w = images.shape
    rows = -(-n // ncol)
    canvas = torch.ones(c, rows * (h + 2), ncol * (w + 2))
    for i, img in enumerate(images):
        r, k = divmod(i, ncol)
        canvas[:, r * (h + 2) + 1 : r * (h + 2) + 1 + h, k * (w + 2) + 1 : k * (w + 2) + 1 + w] = img
    arr = (canvas.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    grid = Image.fromarray(arr[..., 0] if c == 1 else arr).convert("RGB")
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    font = ImageFont.load_default(size=13)
    if col_labels:
        cell = (w + 2) * scale
        wrapped = [textwrap.wrap(label, max(4, cell // 7))[:4] for label in col_labels[:ncol]]
        lines = max(len(t) for t in wrapped)
        captioned = Image.new("RGB", (grid.width, grid.height + 6 + 15 * lines), "white")
        captioned.paste(grid, (0, 0))
        draw = ImageDraw.Draw(captioned)
        for k, text in enumerate(wrapped):
            for j, line in enumerate(text):
                draw.text((k * cell + cell // 2, grid.height + 4 + 15 * j), line, fill="black", font=font, anchor="ma")
        grid = captioned
    if row_labels:
        margin = 8 + max(int(ImageDraw.Draw(grid).textlength(label, font=font)) for label in row_labels)
        labelled = Image.new("RGB", (grid.width + margin, grid.height), "white")
        labelled.paste(grid, (margin, 0))
        draw = ImageDraw.Draw(labelled)
        for r, label in enumerate(row_labels[:rows]):
            draw.text((4, (r * (h + 2) + 1 + h // 2) * scale), label, fill="black", font=font, anchor="lm")
        grid = labelled
    with atomic_file(path) as tmp:
        grid.save(tmp, format="PNG")
    return path


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


class _Model:
    """One model to evaluate: a transformer (the pipeline's, unless given) with the VAE and text encoders of `pipe`."""

    def __init__(self, pipe, msl: int, transformer=None):
        self.pipe, self.msl = pipe, msl
        self.transformer = pipe.transformer if transformer is None else transformer
        self.null_e, self.null_p = encode_prompts(pipe, [""], msl)

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


def _load(pipe_dir, device) -> _Model:
    return _Model(load_pipeline(pipe_dir, device), max_sequence_length(pipe_dir))


def evaluate(
    cfg: EvaluateConfig, data_dir, classifier_dir, teacher_dir, student_dir, tracker, align=None, inpaint=None
) -> dict:
    """`align`: the AlignConfig (None or disabled: no aligned rows); `inpaint`: the InpaintConfig (enabled: the
    models inpaint the test images)."""
    world = init_world(cfg.device)
    try:
        return _evaluate(cfg, data_dir, classifier_dir, teacher_dir, student_dir, tracker, world, align, inpaint)
    finally:
        close_world(world)


def _extractors(cfg: EvaluateConfig, features: str, classifier_dir):
    """(FD extractor, its weights' path, CLIP scorer or None), loaded and checked before any sampling."""
    path = {"classifier": classifier_dir, "inception": cfg.inception_path, "clip": cfg.clip_path}[features]
    extractor = FEATURE_EXTRACTORS[features](path, EXTRACTOR_PATH_KEYS[features])
    clip = extractor if features == "clip" else (load_clip(cfg.clip_path) if cfg.clip_path else None)
    return extractor, path, clip


def _buckets(
    cfg: EvaluateConfig, student_meta: dict, teacher_dir, held_out, inpainting: bool
) -> list[tuple[tuple[int, int], float]]:
    """The (pixel size, share) pairs to evaluate at: `evaluate.resolution` when set; else the buckets the student
    was distilled on, with their shares of the records (a multi-aspect student is scored where it was trained);
    else the teacher's native size. Inpainting works at the held-out images' size."""
    if inpainting:
        return [(tuple(held_out.images.shape[-2:]), 1.0)]
    if cfg.resolution is not None:
        return [(tuple(cfg.resolution), 1.0)]
    trained = [(tuple(b["resolution"]), float(b["share"])) for b in student_meta.get("buckets", [])]
    return trained or [(native_resolution(teacher_dir), 1.0)]


def _distillation_teacher(cfg: EvaluateConfig, student_meta: dict) -> tuple[float, int]:
    """(CFG, steps) of the teacher row: evaluate.guidance / teacher_steps, else the teacher the student learnt from
    (its synthetic data's, in its ladd.json), whose samples fd_teacher (the field's FID-T) measures against."""
    learnt = student_meta.get("distillation_teacher", {})
    guidance = cfg.guidance if cfg.guidance is not None else learnt.get("guidance")
    steps = cfg.teacher_steps if cfg.teacher_steps is not None else learnt.get("steps")
    if guidance is None or steps is None:
        raise ConfigError(
            "evaluate.guidance / evaluate.teacher_steps: the student's ladd.json does not say which teacher "
            "it was distilled from (an older student): set both"
        )
    for key, ours, theirs in (
        ("guidance", guidance, learnt.get("guidance")),
        ("teacher_steps", steps, learnt.get("steps")),
    ):
        if theirs is not None and ours != theirs:
            log.warning(
                "evaluate.%s %s differs from the teacher the student was distilled from (%s): fd_teacher is "
                "then not FID-T against its own teacher",
                key,
                ours,
                theirs,
            )
    return float(guidance), int(steps)


def _evaluate(
    cfg: EvaluateConfig,
    data_dir,
    classifier_dir,
    teacher_dir,
    student_dir,
    tracker,
    world: World,
    align=None,
    inpaint=None,
) -> dict:
    out, device = Path(cfg.out_dir), world.device
    split_dir = Path(data_dir) / cfg.split
    if not split_dir.is_dir():
        raise ConfigError(
            f"evaluate.split: {cfg.split}, and {split_dir} does not exist (prepare.val_fraction: 0 writes no val split)"
        )
    train, test = load_split(Path(data_dir) / "train"), load_split(split_dir)  # `test`: the held-out split scored
    if cfg.real_images == "required" and test.images is None:
        raise ConfigError(f"evaluate.real_images: required, but {split_dir} has no images (prompts only)")
    use_real = cfg.real_images != "off" and test.images is not None
    features = resolve_features(
        cfg.features, test.images is not None and bool((test.labels >= 0).all()), cfg.clip_path, cfg.inception_path
    )
    extractor, extractor_path, clip = _extractors(cfg, features, classifier_dir)
    aligned_dir = model_dir(align, student_dir) if align is not None and align.enabled else None
    reward = load_reward(align.reward, align.reward_path, classifier_dir) if aligned_dir else None
    n = min(cfg.num_samples, len(test.captions)) if cfg.num_samples > 0 else len(test.captions)
    prompts, labels = list(test.captions["prompt"][:n]), test.labels[:n]
    gate_metric = resolve_metric(cfg.gate_metric, use_real)
    if gate_metric == "fd" and not use_real:
        raise ConfigError(
            f"evaluate.gate_metric: fd needs real images, and {split_dir} has none (or "
            "evaluate.real_images is off): use fd_teacher"
        )
    if gate_metric in ("fd_teacher", "fd_reference") and len(cfg.seeds) < 2:
        raise ConfigError(
            f"evaluate.gate_metric: {gate_metric} compares with the teacher's samples of another seed: "
            f"evaluate.seeds needs two or more (or gate on {gate_metric}_same_noise)"
        )
    if gate_metric == "accuracy" and not (labels >= 0).any():
        raise ConfigError(f"evaluate.gate_metric: accuracy needs labelled prompts, and {split_dir} has none")
    inpainting = inpaint is not None and inpaint.enabled  # every model inpaints test image i under record i's mask
    if inpainting:
        for pipe_dir in (teacher_dir, student_dir):
            check_task(pipe_dir, True)
        if test.images is None:
            raise ConfigError(f"inpaint.enabled: {split_dir} has no images to inpaint (prompts only)")
        if cfg.resolution is not None and tuple(cfg.resolution) != tuple(test.images.shape[-2:]):
            raise ConfigError(
                f"evaluate.resolution: inpainting works at the test images' size "
                f"{list(test.images.shape[-2:])}, got {list(cfg.resolution)}: leave it null"
            )
    student_meta = read_meta(student_dir)
    guidance, teacher_steps = _distillation_teacher(cfg, student_meta)
    buckets = _buckets(cfg, student_meta, teacher_dir, test, inpainting)
    shapes = bucket_latent_shapes(teacher_dir, [r for r, _ in buckets], "evaluate.resolution")
    teacher = _load(teacher_dir, device)
    student = _load(student_dir, device)
    if cfg.raw_student:
        from diffusers import SD3Transformer2DModel

        student.transformer = SD3Transformer2DModel.from_pretrained(Path(student_dir) / "ladd_raw_transformer").to(
            device
        )
    if aligned_dir is not None:  # its own transformer; text encoders and VAE are the student's
        aligned = _Model(student.pipe, student.msl, load_transformer(aligned_dir, device))
    for k in cfg.few_steps:
        untrained = [
            t
            for t in student_sigmas(k, student_meta)[:-1].tolist()
            if min(abs(t - s) for s in student_meta.get("student_times", [1.0])) > 1e-6
        ]
        if untrained:
            log.warning("the student's %d-step schedule visits times it was not trained at: %s", k, untrained)
    shift = teacher.pipe.scheduler.config.shift
    grid_n = min(cfg.grid_size, n)
    real = embed(extractor, test.images.float() / 255)[0] if use_real and world.main else None
    reward_labels = labels.tolist() if reward is not None and REWARDS[align.reward].needs_labels else None
    # the many-step teachers' sample features, {role: {(bucket, seed): features}}: fd_teacher's reference (the teacher
    # the student learnt from) and, when evaluate.reference_guidance differs from its CFG, fd_reference's
    references: dict[str, dict] = {}
    reference_guidance = None if cfg.reference_guidance in (None, guidance) else cfg.reference_guidance
    protocol = (
        None
        if not world.main
        else {  # fingerprints read every weight file: rank 0 alone uses them
            "prompts": prompts_fingerprint(prompts),
            "num_samples": n,
            "seeds": list(cfg.seeds),
            **(
                {"resolution": list(buckets[0][0])}
                if len(buckets) == 1
                else {"resolutions": [list(r) for r, _ in buckets], "resolution_shares": [s for _, s in buckets]}
            ),
            "gate_steps": cfg.gate_steps,
            "teacher_steps": teacher_steps,
            "guidance": guidance,
            **({"reference_guidance": reference_guidance} if reference_guidance is not None else {}),
            **({"split": cfg.split} if cfg.split != "test" else {}),  # test protocols read as before
            "features": features,
            "features_weights": fingerprint(extractor_path),
            "clip_weights": fingerprint(cfg.clip_path) if cfg.clip_path else None,
            "real_images": fingerprint(split_dir / "images.safetensors") if use_real else None,
            "teacher": fingerprint(Path(teacher_dir) / "transformer"),
            **({"inpaint_mask_seed": inpaint.mask_seed} if inpainting else {}),  # text-to-image protocols unchanged
        }
    )
    metrics: dict = {
        "split": cfg.split,
        "num_samples": n,
        "seeds": list(cfg.seeds),
        "features": features,
        "resolutions": [{"resolution": list(r), "share": s} for r, s in buckets],
        "protocol": protocol,
    }
    if use_real and world.main:
        metrics["real_floor"] = summarize_seeds(
            [real_floor(extractor, train, test, n, seed, real) for seed in cfg.seeds]
        )

    def bucket_rows(model, b, sigmas, guidance, sampler, role, on):
        """Every seed of one configuration sampled at bucket `b` and scored: (per-seed figures, the first seed's
        grid images); ([], None) on ranks other than the main one."""
        shape = shapes[b]
        kept = {seed: {} for seed in cfg.seeds}  # seed -> figure -> this rank's per-batch tensors, in batch order
        seconds, sampled = dict.fromkeys(cfg.seeds, 0.0), 0
        for start in range(on.rank * cfg.batch_size, n, on.size * cfg.batch_size):
            rows = range(start, min(start + cfg.batch_size, n))
            batch = prompts[start : rows.stop]
            embeds, pooled = model.encode(batch)  # once for every seed; not timed (ms_per_image is the sampler's)
            text = clip.text_embeds(batch) if clip is not None else None
            condition = None
            if inpainting:
                masks = record_masks("evaluate", rows, inpaint.mask_seed, *test.images.shape[-2:])
                condition = inpaint_condition(model.pipe.vae, test.images[start : rows.stop], masks)
                outside, original = (masks < 0.5).float(), test.images[start : rows.stop].float() / 255
            for seed in cfg.seeds:
                # record i of seed s starts from seed s * 1_000_003 + i: the seeds' noises never overlap
                noise = record_noise([seed * 1_000_003 + i for i in rows], shape)
                tick = time.perf_counter()
                images = model.sample(
                    start, embeds, pooled, noise, sigmas, guidance, sampler, cfg.batch_size, seed, condition
                )
                seconds[seed] += time.perf_counter() - tick
                got = dict(zip(("feats", "logits"), embed(extractor, images)))
                if clip is not None:  # per image; clip_score is their mean
                    got["clip_score"] = (100 * (clip.image_embeds(images) * text).sum(-1)).clamp(min=0)
                if reward is not None:
                    got["reward"] = reward(
                        images, batch, None if reward_labels is None else reward_labels[start : rows.stop]
                    )
                if inpainting:  # what had to stay: the real image outside the mask
                    error = (images.float() - original).pow(2) * outside
                    got["outside_mse"] = error.sum((1, 2, 3)) / (outside.sum((1, 2, 3)) * images.shape[1])
                if seed == cfg.seeds[0] and (start == 0 or start < grid_n):  # rank 0 always has one (grid_n may be 0)
                    got["grid"] = images[: grid_n - start]
                for k, v in got.items():
                    if v is not None:
                        kept[seed].setdefault(k, []).append(v.float())
            sampled += len(rows)
        per_seed, first, seed_feats = [], None, {}
        for seed in cfg.seeds:
            # every rank joins each gather, even one with no batch (rank 0 has batch 0: it holds every figure there is)
            got = {
                k: on.gather_batches(
                    torch.cat(kept[seed][k]) if k in kept[seed] else torch.empty(0),
                    grid_n if k == "grid" else n,
                    cfg.batch_size,
                )
                for k in FIGURES
            }
            if not on.main:
                continue
            got = {k: v for k, v in got.items() if k in kept[seed]}
            seed_feats[seed] = got["feats"]
            row = {
                "ms_per_image": seconds[seed] * 1000 / max(sampled, 1),
                **score_features(got["feats"], got.get("logits"), labels, real),
            }
            row.update({k: float(got[k].mean()) for k in ("clip_score", "reward", "outside_mse") if k in got})
            per_seed.append(row)
            first = got["grid"] if first is None else first
        if not on.main:
            return [], None
        if role is not None:
            references[role].update({(b, seed): f for seed, f in seed_feats.items()})
        seeds = list(cfg.seeds)
        for name, feats_of in references.items():
            for i, (seed, r) in enumerate(zip(seeds, per_seed)):
                if name != role:  # against the same noise: also rewards following that teacher's ODE path
                    r[f"fd_{name}_same_noise"] = frechet_distance(feats_of[(b, seed)].numpy(), seed_feats[seed].numpy())
                if (
                    len(seeds) > 1
                ):  # against the next seed's samples (other noise, same prompts); its own row: the floor
                    other = feats_of[(b, seeds[(i + 1) % len(seeds)])]
                    r[f"fd_{name}"] = frechet_distance(other.numpy(), seed_feats[seed].numpy())
        return per_seed, first

    def measure(model, steps, sigmas, guidance, sampler, name, role=None, solo=False):
        """The row of one sampler configuration: every seed at every bucket sampled and scored, and its first seed's
        images at the first bucket (saved as grids/<name>.png unless `solo`); `role`: teacher or reference, whose
        features fd_<role> measures against. With several buckets, each figure is the share-weighted mean over
        them, seed by seed, and the row keeps each bucket's own under `buckets`."""
        on = replace(world, rank=0, size=1) if solo else world
        if role is not None:
            references[role] = {}
        per_bucket, first = [], None
        for b in range(len(buckets)):
            per_seed, grid = bucket_rows(model, b, sigmas, guidance, sampler, role, on)
            per_bucket.append(per_seed)
            first = grid if first is None else first
        if not on.main:
            return {}, None
        shares = np.array([s for _, s in buckets]) / sum(s for _, s in buckets)
        mixed = [
            {k: float(sum(w * rows[i][k] for w, rows in zip(shares, per_bucket))) for k in per_bucket[0][i]}
            for i in range(len(cfg.seeds))
        ]
        row = {
            "steps": steps,
            "guidance": guidance,
            "nfe": steps * (2 if guidance > 1 else 1),
            **summarize_seeds(mixed),
        }
        if len(buckets) > 1:
            row["buckets"] = {f"{h}x{w}": summarize_seeds(rows) for ((h, w), _), rows in zip(buckets, per_bucket)}
        if not solo:
            save_grid(first, out / "grids" / f"{name}.png")
        log.info(
            "%s: %s (%d seeds)",
            name,
            ", ".join(f"{k} {row[k]:.3f} ± {row[f'{k}_std']:.3f}" for k in HEADLINE if k in row),
            len(cfg.seeds),
        )
        return row, first

    many_steps = flow_sigmas(teacher_steps, shift)
    if reference_guidance is not None:  # fd_reference's teacher: the same one at another CFG; its own row first
        metrics["reference"], _ = measure(
            teacher,
            teacher_steps,
            many_steps,
            reference_guidance,
            "euler",
            f"reference_{teacher_steps}",
            role="reference",
        )
    metrics["teacher"], teacher_imgs = measure(
        teacher, teacher_steps, many_steps, guidance, "euler", f"teacher_{teacher_steps}", role="teacher"
    )
    metrics["teacher_naive"], metrics["student"] = {}, {}
    if aligned_dir is not None:
        metrics["aligned"] = {}
    side_by_side, labels_by_row = (
        [teacher_imgs],
        [_label(f"teacher, {teacher_steps} steps, CFG {guidance:g}", metrics["teacher"])],
    )
    for k in cfg.few_steps:
        metrics["teacher_naive"][str(k)], _ = measure(
            teacher, k, flow_sigmas(k, shift), guidance, "euler", f"teacher_naive_{k}"
        )
        metrics["student"][str(k)], imgs = measure(
            student, k, student_sigmas(k, student_meta), 0.0, student_meta.get("sampler", "euler"), f"student_{k}"
        )
        side_by_side.append(imgs)
        labels_by_row.append(_label(f"student, {k} step{'s' if k > 1 else ''}", metrics["student"][str(k)]))
        if aligned_dir is not None:
            metrics["aligned"][str(k)], imgs = measure(
                aligned, k, student_sigmas(k, student_meta), 0.0, student_meta.get("sampler", "euler"), f"aligned_{k}"
            )
            side_by_side.append(imgs)
            labels_by_row.append(_label(f"aligned, {k} step{'s' if k > 1 else ''}", metrics["aligned"][str(k)]))
    if not world.main:
        return {}
    # teacher (top row) vs the student at each step count, same prompts and seeds, one column per prompt
    ncol = min(grid_n, 10)
    if inpainting:  # the input: the test image with its hole in grey
        masks = record_masks("evaluate", range(ncol), inpaint.mask_seed, *test.images.shape[-2:])
        holes = masked_images(test.images[:ncol].float() / 127.5 - 1, masks) / 2 + 0.5
        side_by_side, labels_by_row = [holes, *side_by_side], ["masked input", *labels_by_row]
    save_grid(
        torch.cat([g[:ncol] for g in side_by_side]),
        out / "grids" / "teacher_vs_student.png",
        ncol=ncol,
        row_labels=labels_by_row,
        col_labels=prompts[:ncol],
    )
    write_json(out / "quality_vs_nfe.json", {"rows": _plot_rows(metrics)})
    write_json(
        out / "metrics.json", metrics
    )  # first without the registration: a tracking server lost below loses no figure
    write_json(out / "align.json", align_report(metrics, align) if aligned_dir else {"enabled": False})
    summary_path = Path(student_dir) / "ladd_train_summary.json"
    train_summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    write_model_card(student_dir, student_meta, train_summary, metrics)  # before registering: the model carries it
    if aligned_dir is not None:
        write_model_card(aligned_dir, read_meta(aligned_dir), train_summary, metrics)
    tracker.log_summary(flatten_metrics({k: v for k, v in metrics.items() if k != "protocol"}))
    tracker.set_tags({"evaluate.protocol": json.dumps(protocol, sort_keys=True)})
    final_dir = aligned_dir or Path(student_dir)  # what the gate judges and registers
    gate = metrics["aligned" if aligned_dir else "student"].get(str(cfg.gate_steps))
    if cfg.register and gate is None:
        log.warning(
            "not registering the student: evaluate.gate_steps=%d is not in few_steps %s",
            cfg.gate_steps,
            list(cfg.few_steps),
        )
    if cfg.register and gate is not None:

        def rescore(pipe_dir):  # the champion's student under this evaluation's protocol (rank 0 alone)
            meta = read_meta(pipe_dir)
            if (meta.get("task") == "inpaint") != inpainting:  # inpainting and text-to-image never compare
                kind = "an inpainting" if not inpainting else "a text-to-image"
                raise ConfigError(
                    f"evaluate.model_name: {cfg.model_name}'s champion is {kind} student and this one is "
                    "not: register it under another evaluate.model_name"
                )
            row, _ = measure(
                _load(pipe_dir, device),
                cfg.gate_steps,
                student_sigmas(cfg.gate_steps, meta),
                0.0,
                meta.get("sampler", "euler"),
                "champion_rescored",
                solo=True,
            )
            return {k: row[k] for k in HEADLINE if k in row}

        candidate = {k: gate[k] for k in HEADLINE if k in gate}
        registered = register_and_gate(
            cfg, candidate, gate_metric, protocol, final_dir, open_registry(tracker), rescore
        )
        if registered:
            log.info(
                "registered %s version %s: %s (%s)",
                cfg.model_name,
                registered["version"],
                "champion" if registered["promoted"] else "rejected",
                registered["reason"],
            )
            metrics["registered"] = registered
    write_json(out / "metrics.json", metrics)
    tracker.log_artifact(out / "metrics.json")
    tracker.log_artifact(out / "quality_vs_nfe.json")
    tracker.log_artifact(out / "align.json")
    tracker.log_artifact(out / "grids", "grids")
    return metrics


def _label(name: str, row: dict) -> str:
    names = {"fd": "FD", "fd_teacher": "FD-T", "clip_score": "CLIP"}
    figures = [f"{names[k]} {row[k]:.1f}" for k in ("fd", "fd_teacher", "clip_score") if k in row]
    return f"{name}: {', '.join(figures)}" if figures else name


def _plot_rows(metrics: dict) -> list[dict]:
    """quality_vs_nfe.json: the floors, the teacher, the naive teacher and the student, each with its figures."""

    def row(model, r):
        return {"model": model, **{k: r[k] for k in ROW_KEYS if k in r}}

    rows = [row("real_floor", {"nfe": 0, **metrics["real_floor"]})] if "real_floor" in metrics else []
    rows += [row("reference", metrics["reference"])] if "reference" in metrics else []
    rows.append(row("teacher", metrics["teacher"]))
    for kind in ("teacher_naive", "student", "aligned"):
        rows += [row(kind, r) for r in metrics.get(kind, {}).values()]
    return rows


def align_report(metrics: dict, align) -> dict:
    """reports/align.json: the student (before) and the aligned student (after) at each step count, means and
    spreads of the headline figures (and precision/recall where measured)."""
    keys = [k for m in (*HEADLINE, "precision", "recall") for k in (m, f"{m}_std")]

    def side(rows):
        return {k: {m: r[m] for m in keys if m in r} for k, r in rows.items()}

    return {
        "enabled": True,
        "reward": align.reward,
        "seeds": metrics["seeds"],
        "num_samples": metrics["num_samples"],
        "before": side(metrics["student"]),
        "after": side(metrics["aligned"]),
    }


def flatten_metrics(metrics: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            flat.update(flatten_metrics(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float, np.floating)) and not isinstance(v, bool):
            flat[f"{prefix}{k}"] = float(v)
    return flat
