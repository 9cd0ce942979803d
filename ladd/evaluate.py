"""`ladd evaluate`: the quality-vs-steps table. Teacher at its default (many steps, CFG), the teacher
sampled naively at few steps, the student at few steps (no CFG), and the real-vs-real floor; same
held-out prompts, same per-record noise, same batch size for the timings. FD on a few hundred samples
moves by points with the noise, so every figure is the mean over `seeds` with its spread (std).

Under torchrun each rank samples every world-size-th batch (each exactly as one process samples it); rank 0
gathers the images, scores them and writes everything."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ladd.card import write_model_card
from ladd.config import EvaluateConfig
from ladd.data.prepare import load_split
from ladd.distributed import World, close_world, init_world
from ladd.generate import generate_latents, record_noise
from ladd.io import atomic_file, write_json
from ladd.pipeline import decode_latents, encode_prompts, latent_shape, load_pipeline, max_sequence_length, read_meta
from ladd.quality import FEATURE_EXTRACTORS, real_features, real_floor, score_images
from ladd.sampling import flow_sigmas
from ladd.schedules import few_step_times

log = logging.getLogger(__name__)


def save_grid(images: torch.Tensor, path: Path, ncol: int = 10, row_labels: list[str] | None = None,
              scale: int = 3) -> Path:
    """float [N, C, H, W] in [0, 1] -> one PNG, `ncol` images a row, upscaled `scale`x; with `row_labels`,
    each row is named in a margin on its left."""
    n, c, h, w = images.shape
    rows = -(-n // ncol)
    canvas = torch.ones(c, rows * (h + 2), ncol * (w + 2))
    for i, img in enumerate(images):
        r, k = divmod(i, ncol)
        canvas[:, r * (h + 2) + 1 : r * (h + 2) + 1 + h, k * (w + 2) + 1 : k * (w + 2) + 1 + w] = img
    arr = (canvas.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    grid = Image.fromarray(arr[..., 0] if c == 1 else arr).convert("RGB")
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    if row_labels:
        font = ImageFont.load_default(size=13)
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


def student_sigmas(steps: int, student_meta: dict) -> torch.Tensor:
    """k-step schedule of a saved student, as its diffusers scheduler gives it: its schedule's times from 1
    to its smallest training time, then 0."""
    times = student_meta.get("student_times", [1.0])
    return torch.tensor([*few_step_times(student_meta.get("schedule", "exponential"), steps, min(times)), 0.0],
                        dtype=torch.float32)


class _Model:
    """One sampler configuration to evaluate: a transformer, its schedule, guidance and sampler."""

    def __init__(self, pipe, embeds, pooled, null_e, null_p):
        self.pipe, self.embeds, self.pooled, self.null_e, self.null_p = pipe, embeds, pooled, null_e, null_p

    def run(self, noise, sigmas, guidance, sampler, batch_size, seed, world: World):
        """Images of every row on rank 0 (None on the others), and the ms per image of this rank's share."""
        start = time.perf_counter()
        lat = generate_latents(self.pipe.transformer, self.embeds, self.pooled, noise, sigmas, guidance, self.null_e,
                               self.null_p, sampler=sampler, batch_size=batch_size, seed=seed,
                               share=(world.rank, world.size))
        images = decode_latents(self.pipe.vae, lat, batch_size) if len(lat) else lat
        ms = (time.perf_counter() - start) * 1000 / max(len(lat), 1)
        return world.gather_batches(images, len(noise), batch_size), ms


def _load(pipe_dir, prompts, device):
    pipe = load_pipeline(pipe_dir, device)
    msl = max_sequence_length(pipe_dir)
    e, p = encode_prompts(pipe, prompts, msl)
    ne, np_ = encode_prompts(pipe, [""], msl)
    return _Model(pipe, e, p, ne, np_)


def evaluate(cfg: EvaluateConfig, data_dir, classifier_dir, teacher_dir, student_dir, tracker) -> dict:
    world = init_world(cfg.device)
    try:
        return _evaluate(cfg, data_dir, classifier_dir, teacher_dir, student_dir, tracker, world)
    finally:
        close_world(world)


def _evaluate(cfg: EvaluateConfig, data_dir, classifier_dir, teacher_dir, student_dir, tracker, world: World) -> dict:
    out, device = Path(cfg.out_dir), world.device
    train, test = load_split(Path(data_dir) / "train"), load_split(Path(data_dir) / "test")
    if cfg.features not in FEATURE_EXTRACTORS:
        raise ValueError(f"evaluate.features: unknown extractor {cfg.features!r} (known: {', '.join(FEATURE_EXTRACTORS)})")
    classifier = FEATURE_EXTRACTORS[cfg.features](cfg.features_path or classifier_dir)
    real = real_features(classifier, test)
    n = min(cfg.num_samples, len(test.captions)) if cfg.num_samples > 0 else len(test.captions)
    prompts, labels = list(test.captions["prompt"][:n]), test.labels[:n]
    teacher = _load(teacher_dir, prompts, device)
    student_path = Path(student_dir) / ("ladd_raw_transformer" if cfg.raw_student else "")
    student = _load(student_dir, prompts, device)
    if cfg.raw_student:
        from diffusers import SD3Transformer2DModel

        student.pipe.transformer = SD3Transformer2DModel.from_pretrained(student_path).to(device)
    student_meta = read_meta(student_dir)
    for k in cfg.few_steps:
        untrained = [t for t in student_sigmas(k, student_meta)[:-1].tolist()
                     if min(abs(t - s) for s in student_meta.get("student_times", [1.0])) > 1e-6]
        if untrained:
            log.warning("the student's %d-step schedule visits times it was not trained at: %s", k, untrained)
    shape, shift = latent_shape(teacher.pipe), teacher.pipe.scheduler.config.shift
    # record i of seed s starts from seed s * 1_000_003 + i: the seeds' noises never overlap
    noises = {seed: record_noise([seed * 1_000_003 + i for i in range(n)], shape) for seed in cfg.seeds}
    grid_n = min(cfg.grid_size, n)
    floors = [real_floor(classifier, train, test, n, seed) for seed in cfg.seeds]
    metrics: dict = {"real_floor": summarize_seeds(floors), "num_samples": n, "seeds": list(cfg.seeds)}

    def measure(model, steps, sigmas, guidance, sampler, name):
        per_seed, first = [], None
        for seed, noise in noises.items():
            images, ms = model.run(noise, sigmas, guidance, sampler, cfg.batch_size, seed, world)
            if not world.main:
                continue
            per_seed.append({"ms_per_image": ms, **score_images(classifier, images, labels, real)})
            first = images[:grid_n] if first is None else first
        if not world.main:
            return {"fd": float("nan")}, None
        row = {"steps": steps, "guidance": guidance, "nfe": steps * (2 if guidance > 1 else 1), **summarize_seeds(per_seed)}
        save_grid(first, out / "grids" / f"{name}.png")
        log.info("%s: FD %.2f ± %.2f, accuracy %.3f ± %.3f, precision %.3f, recall %.3f (%d seeds)", name, row["fd"],
                 row["fd_std"], row["accuracy"], row["accuracy_std"], row["precision"], row["recall"], len(per_seed))
        return row, first

    metrics["teacher"], teacher_imgs = measure(teacher, cfg.teacher_steps, flow_sigmas(cfg.teacher_steps, shift),
                                               cfg.guidance, "euler", f"teacher_{cfg.teacher_steps}")
    metrics["teacher_naive"], metrics["student"] = {}, {}
    side_by_side = [teacher_imgs]
    labels_by_row = [f"teacher, {cfg.teacher_steps} steps, CFG {cfg.guidance:g}: FD {metrics['teacher']['fd']:.1f}"]
    for k in cfg.few_steps:
        metrics["teacher_naive"][str(k)], _ = measure(teacher, k, flow_sigmas(k, shift), cfg.guidance, "euler", f"teacher_naive_{k}")
        metrics["student"][str(k)], imgs = measure(student, k, student_sigmas(k, student_meta), 0.0,
                                                   student_meta.get("sampler", "euler"), f"student_{k}")
        side_by_side.append(imgs)
        labels_by_row.append(f"student, {k} step{'s' if k > 1 else ''}: FD {metrics['student'][str(k)]['fd']:.1f}")
    if not world.main:
        return {}
    # teacher (top row) vs the student at each step count, same prompts and seeds, one column per prompt
    ncol = min(grid_n, 10)
    save_grid(torch.cat([g[:ncol] for g in side_by_side]), out / "grids" / "teacher_vs_student.png", ncol=ncol,
              row_labels=labels_by_row)
    rows = [{"model": "real_floor", **_row({"nfe": 0, **metrics["real_floor"]})}, {"model": "teacher", **_row(metrics["teacher"])}]
    for kind in ("teacher_naive", "student"):
        rows += [{"model": kind, **_row(r)} for r in metrics[kind].values()]
    write_json(out / "quality_vs_nfe.json", {"rows": rows})
    summary_path = Path(student_dir) / "ladd_train_summary.json"
    train_summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    write_model_card(student_dir, student_meta, train_summary, metrics)  # before registering: the model carries it
    tracker.log_metrics(flatten_metrics(metrics))
    gate = metrics["student"].get(str(cfg.gate_steps))
    if cfg.register and gate is None:
        log.warning("not registering the student: evaluate.gate_steps=%d is not in few_steps %s", cfg.gate_steps, list(cfg.few_steps))
    if cfg.register and gate is not None:
        candidate = {"fd": gate["fd"], "accuracy": gate["accuracy"]}
        registered = tracker.register_student(
            student_dir, cfg.model_name, candidate,
            lambda champion: gate_decision(candidate, champion, cfg.gate_max_fd_increase, cfg.gate_max_accuracy_drop))
        if registered:
            log.info("registered %s version %s: %s (%s)", cfg.model_name, registered["version"],
                     "champion" if registered["promoted"] else "rejected", registered["reason"])
            metrics["registered"] = registered
    write_json(out / "metrics.json", metrics)
    tracker.log_artifact(out / "metrics.json")
    tracker.log_artifact(out / "quality_vs_nfe.json")
    tracker.log_artifact(out / "grids", "grids")
    return metrics


def _row(r: dict) -> dict:
    return {k: r[k] for k in ("nfe", "fd", "fd_std", "accuracy", "accuracy_std")}


def flatten_metrics(metrics: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            flat.update(flatten_metrics(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float, np.floating)):
            flat[f"{prefix}{k}"] = float(v)
    return flat


def gate_decision(candidate: dict, champion: dict | None, max_fd_increase: float, max_accuracy_drop: float) -> tuple[bool, str]:
    """Champion gate on the student at 4 steps (or its largest evaluated step count): promote when FD is
    no worse than the champion's (+ max_fd_increase) and accuracy at most max_accuracy_drop lower."""
    if champion is None:
        return True, "no champion yet"
    fd, acc = candidate["fd"], candidate["accuracy"]
    if fd > champion["fd"] + max_fd_increase:
        return False, f"FD {fd:.2f} worse than champion's {champion['fd']:.2f} (+{max_fd_increase} allowed)"
    if acc < champion["accuracy"] - max_accuracy_drop:
        return False, f"accuracy {acc:.3f} more than {max_accuracy_drop} below champion's {champion['accuracy']:.3f}"
    return True, f"FD {fd:.2f} <= {champion['fd']:.2f}, accuracy {acc:.3f} vs {champion['accuracy']:.3f}"
