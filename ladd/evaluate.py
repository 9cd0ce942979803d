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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ladd.align import REWARDS, load_reward, model_dir
from ladd.card import write_model_card
from ladd.config import EvaluateConfig, resolve_features
from ladd.data.prepare import load_split
from ladd.distributed import World, close_world, init_world
from ladd.errors import ConfigError
from ladd.gate import prompts_fingerprint, resolve_metric
from ladd.inpaint import check_task, masked_images, record_masks
from ladd.io import fingerprint, write_json
from ladd.pipeline import (
    bucket_latent_shapes,
    load_transformer,
    native_resolution,
    read_meta,
)
from ladd.plots import save_grid
from ladd.quality import FEATURE_EXTRACTORS, embed, load_clip, real_floor
from ladd.registry import champion_rescorer, open_registry, register_and_gate
from ladd.sampling import flow_sigmas
from ladd.schedules import student_sigmas
from ladd.scoring import HEADLINE, Model, ScoringTable, summarize_seeds

log = logging.getLogger(__name__)

ROW_KEYS = ("nfe", *(k for m in HEADLINE for k in (m, f"{m}_std")))  # quality_vs_nfe.json's columns
EXTRACTOR_PATH_KEYS = {
    "classifier": "evaluate.features",
    "inception": "evaluate.inception_path",
    "clip": "evaluate.clip_path",
}


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


@dataclass
class _Inputs:
    """An evaluation's inputs, every setting checked against the data and the models before any sampling."""

    split_dir: Path
    train: object
    test: object
    features: str
    extractor_path: object
    use_real: bool
    gate_metric: str
    inpainting: bool
    aligned_dir: Path | None
    student_meta: dict
    guidance: float
    teacher_steps: int
    reference_guidance: float | None
    table: ScoringTable


def _inputs(cfg: EvaluateConfig, data_dir, classifier_dir, teacher_dir, student_dir, world: World, align, inpaint):
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
    table = ScoringTable(
        world,
        prompts,
        labels,
        test.images,
        tuple(cfg.seeds),
        cfg.batch_size,
        min(cfg.grid_size, n),
        buckets,
        shapes,
        extractor,
        clip,
        reward,
        labels.tolist() if reward is not None and REWARDS[align.reward].needs_labels else None,
        None,  # the real images' features: embedded once the models are loaded
        inpaint.mask_seed if inpainting else None,
    )
    reference_guidance = None if cfg.reference_guidance in (None, guidance) else cfg.reference_guidance
    return _Inputs(
        split_dir,
        train,
        test,
        features,
        extractor_path,
        use_real,
        gate_metric,
        inpainting,
        aligned_dir,
        student_meta,
        guidance,
        teacher_steps,
        reference_guidance,
        table,
    )


def _protocol(cfg: EvaluateConfig, inputs: _Inputs, teacher_dir, inpaint) -> dict:
    """What the figures were measured under (their gate compares like with like): prompts, seeds, resolutions, the
    teacher rows' settings, the feature weights and the real images, by fingerprint (every weight file read)."""
    table, buckets = inputs.table, inputs.table.buckets
    return {
        "prompts": prompts_fingerprint(table.prompts),
        "num_samples": len(table.prompts),
        "seeds": list(cfg.seeds),
        **(
            {"resolution": list(buckets[0][0])}
            if len(buckets) == 1
            else {"resolutions": [list(r) for r, _ in buckets], "resolution_shares": [s for _, s in buckets]}
        ),
        "gate_steps": cfg.gate_steps,
        "teacher_steps": inputs.teacher_steps,
        "guidance": inputs.guidance,
        **({"reference_guidance": inputs.reference_guidance} if inputs.reference_guidance is not None else {}),
        **({"split": cfg.split} if cfg.split != "test" else {}),  # test protocols read as before
        "features": inputs.features,
        "features_weights": fingerprint(inputs.extractor_path),
        "clip_weights": fingerprint(cfg.clip_path) if cfg.clip_path else None,
        "real_images": fingerprint(inputs.split_dir / "images.safetensors") if inputs.use_real else None,
        "teacher": fingerprint(Path(teacher_dir) / "transformer"),
        **({"inpaint_mask_seed": inpaint.mask_seed} if inputs.inpainting else {}),  # text-to-image protocols unchanged
    }


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
    inputs = _inputs(cfg, data_dir, classifier_dir, teacher_dir, student_dir, world, align, inpaint)
    table, test, student_meta, aligned_dir = inputs.table, inputs.test, inputs.student_meta, inputs.aligned_dir
    teacher, student = Model.load(teacher_dir, device), Model.load(student_dir, device)
    if cfg.raw_student:
        from diffusers import SD3Transformer2DModel

        raw = SD3Transformer2DModel.from_pretrained(Path(student_dir) / "ladd_raw_transformer")
        student.transformer = raw.to(device)
    aligned = None
    if aligned_dir is not None:  # its own transformer; text encoders and VAE are the student's
        aligned = Model(student.pipe, student.msl, load_transformer(aligned_dir, device))
    for k in cfg.few_steps:
        trained = student_meta.get("student_times", [1.0])
        untrained = [
            t for t in student_sigmas(k, student_meta)[:-1].tolist() if min(abs(t - s) for s in trained) > 1e-6
        ]
        if untrained:
            log.warning("the student's %d-step schedule visits times it was not trained at: %s", k, untrained)
    if inputs.use_real and world.main:
        table.real = embed(table.extractor, test.images.float() / 255)[0]
    protocol = _protocol(cfg, inputs, teacher_dir, inpaint) if world.main else None  # rank 0 alone uses it
    metrics: dict = {
        "split": cfg.split,
        "num_samples": len(table.prompts),
        "seeds": list(cfg.seeds),
        "features": inputs.features,
        "resolutions": [{"resolution": list(r), "share": s} for r, s in table.buckets],
        "protocol": protocol,
    }
    if inputs.use_real and world.main:
        n = len(table.prompts)
        metrics["real_floor"] = summarize_seeds(
            [real_floor(table.extractor, inputs.train, test, n, seed, table.real) for seed in cfg.seeds]
        )
    grids = _score_rows(cfg, inputs, metrics, teacher, student, aligned)
    if not world.main:
        return {}
    _write_reports(cfg, inputs, metrics, grids, out, student_dir, align, inpaint, tracker)
    gate = metrics["aligned" if aligned_dir else "student"].get(str(cfg.gate_steps))
    if cfg.register and gate is None:
        log.warning(
            "not registering the student: evaluate.gate_steps=%d is not in few_steps %s",
            cfg.gate_steps,
            list(cfg.few_steps),
        )
    if cfg.register and gate is not None:

        def rescore(pipe_dir, meta):  # the champion's student under this evaluation's protocol (rank 0 alone)
            sigmas = student_sigmas(cfg.gate_steps, meta)
            model = Model.load(pipe_dir, device)
            return table.row(
                model, cfg.gate_steps, sigmas, 0.0, meta.get("sampler", "euler"), "champion_rescored", solo=True
            )[0]

        candidate = {k: gate[k] for k in HEADLINE if k in gate}
        registered = register_and_gate(
            cfg,
            candidate,
            inputs.gate_metric,
            protocol,
            aligned_dir or Path(student_dir),  # what the gate judges and registers
            open_registry(tracker),
            champion_rescorer(rescore, cfg.model_name, inputs.inpainting, HEADLINE),
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


def _score_rows(cfg: EvaluateConfig, inputs: _Inputs, metrics: dict, teacher, student, aligned) -> dict:
    """The table's rows into `metrics`: the reference teacher (another CFG, when set), the teacher the student learnt
    from, that teacher sampled naively at few steps, the student (and the aligned student) at each of `few_steps`.
    Returns each row's first images by grid name, and the side-by-side rows with their labels."""
    table, meta, guidance, teacher_steps = inputs.table, inputs.student_meta, inputs.guidance, inputs.teacher_steps
    shift = teacher.pipe.scheduler.config.shift
    many_steps, grids = flow_sigmas(teacher_steps, shift), {}
    if inputs.reference_guidance is not None:  # fd_reference's teacher: the same one at another CFG; its own row first
        name = f"reference_{teacher_steps}"
        row, grids[name] = table.row(
            teacher, teacher_steps, many_steps, inputs.reference_guidance, "euler", name, role="reference"
        )
        metrics["reference"] = row
    name = f"teacher_{teacher_steps}"
    metrics["teacher"], grids[name] = table.row(teacher, teacher_steps, many_steps, guidance, "euler", name, "teacher")
    side_by_side = [(grids[name], _label(f"teacher, {teacher_steps} steps, CFG {guidance:g}", metrics["teacher"]))]
    students = [("student", student)] + ([("aligned", aligned)] if aligned is not None else [])
    metrics["teacher_naive"] = {}
    metrics.update({kind: {} for kind, _ in students})
    for k in cfg.few_steps:
        name = f"teacher_naive_{k}"
        metrics["teacher_naive"][str(k)], grids[name] = table.row(
            teacher, k, flow_sigmas(k, shift), guidance, "euler", name
        )
        for kind, model in students:
            name = f"{kind}_{k}"
            row, grids[name] = table.row(model, k, student_sigmas(k, meta), 0.0, meta.get("sampler", "euler"), name)
            metrics[kind][str(k)] = row
            side_by_side.append((grids[name], _label(f"{kind}, {k} step{'s' if k > 1 else ''}", row)))
    return {"rows": grids, "side_by_side": side_by_side}


def _write_reports(cfg, inputs: _Inputs, metrics: dict, grids: dict, out: Path, student_dir, align, inpaint, tracker):
    """Rank 0: each row's grid, the teacher-vs-student grid, quality_vs_nfe.json, metrics.json (first without the
    registration: a tracking server lost later loses no figure), align.json, the model cards, the tracker's copy."""
    table, test = inputs.table, inputs.test
    for name, images in grids["rows"].items():
        save_grid(images, out / "grids" / f"{name}.png")
    # teacher (top row) vs the student at each step count, same prompts and seeds, one column per prompt
    ncol = min(table.grid_n, 10)
    side_by_side = grids["side_by_side"]
    if inputs.inpainting:  # the input: the test image with its hole in grey
        masks = record_masks("evaluate", range(ncol), inpaint.mask_seed, *test.images.shape[-2:])
        holes = masked_images(test.images[:ncol].float() / 127.5 - 1, masks) / 2 + 0.5
        side_by_side = [(holes, "masked input"), *side_by_side]
    save_grid(
        torch.cat([images[:ncol] for images, _ in side_by_side]),
        out / "grids" / "teacher_vs_student.png",
        ncol=ncol,
        row_labels=[label for _, label in side_by_side],
        col_labels=table.prompts[:ncol],
    )
    write_json(out / "quality_vs_nfe.json", {"rows": _plot_rows(metrics)})
    write_json(out / "metrics.json", metrics)
    aligned_dir = inputs.aligned_dir
    write_json(out / "align.json", align_report(metrics, align) if aligned_dir else {"enabled": False})
    summary_path = Path(student_dir) / "ladd_train_summary.json"
    train_summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    write_model_card(student_dir, inputs.student_meta, train_summary, metrics)  # before registering: the model has it
    if aligned_dir is not None:
        write_model_card(aligned_dir, read_meta(aligned_dir), train_summary, metrics)
    tracker.log_summary(flatten_metrics({k: v for k, v in metrics.items() if k != "protocol"}))
    tracker.set_tags({"evaluate.protocol": json.dumps(metrics["protocol"], sort_keys=True)})


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
