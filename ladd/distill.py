"""`ladd distill`: Latent Adversarial Diffusion Distillation (Sauer et al. 2024, arXiv 2403.12015).

Student = a copy of the teacher transformer, trained at a few discrete times with the adversarial loss
alone; discriminator = heads on the frozen teacher's block features; real = teacher latents, fake =
student x0_hat, both re-noised to t_hat ~ LogitNormal(m, s). Resumable from an atomic checkpoint.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from tqdm.auto import tqdm

from ladd.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from ladd.config import DistillConfig
from ladd.discriminator import Discriminator, default_feature_layers
from ladd.io import atomic_dir, atomic_file, fingerprint, write_json
from ladd.losses import ADVERSARIAL_LOSSES, approx_r1, mean_logits
from ladd.pipeline import encode_prompts, load_pipeline, max_sequence_length, pick_device, write_meta
from ladd.sampling import time_shift
from ladd.synthesize import load_synthetic
from ladd.teacher import update_ema

log = logging.getLogger(__name__)
CURVE_FIELDS = ("step", "loss_d", "loss_g", "logits_real", "logits_fake", "grad_norm_g", "skipped")


def noise_to(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps (rectified flow forward process)."""
    t = t.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - t) * x0 + t * eps


def logit_normal(n: int, mean: float, std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.sigmoid(mean + std * torch.randn(n, generator=gen))


def student_times(cfg: DistillConfig) -> torch.Tensor:
    return time_shift(torch.tensor(cfg.student_times, dtype=torch.float32), cfg.time_shift)


def _run_fingerprint(cfg: DistillConfig, teacher_dir, synthetic_dir) -> dict:
    """What a checkpoint must match to be resumed (training length and bookkeeping may change)."""
    skip = {"out_dir", "checkpoint", "steps", "checkpoint_every", "log_every", "device"}
    run = {k: v for k, v in asdict(cfg).items() if k not in skip}
    run = {**run, "teacher": fingerprint(teacher_dir), "synthetic": fingerprint(Path(synthetic_dir) / "manifest.json")}
    return json.loads(json.dumps(run))  # as stored in the checkpoint (tuples become lists)


def _curve_path(cfg: DistillConfig) -> Path:
    return Path(cfg.checkpoint).with_suffix(".curve.csv")


def _read_curve(path: Path, before_step: int) -> list[dict]:
    if not path.is_file():
        return []
    return [row for row in csv.DictReader(path.open()) if int(row["step"]) < before_step]


def _write_curve(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CURVE_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    with atomic_file(path) as tmp:
        tmp.write_text(buf.getvalue())


def save_student(pipe, student_ema, student_raw, cfg: DistillConfig, meta: dict, summary: dict) -> None:
    """A complete diffusers pipeline: the teacher's VAE, tokenizers and text encoders, the EMA student
    transformer, and a few-step scheduler whose k-step schedule ends at the smallest training time."""
    times = student_times(cfg).tolist()
    pipe.register_modules(
        transformer=student_ema,
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=1.0, shift_terminal=min(times) if len(times) > 1 else None,
            stochastic_sampling=cfg.sampler == "renoise",
        ),
    )
    with atomic_dir(cfg.out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        student_raw.save_pretrained(tmp / "ladd_raw_transformer", safe_serialization=True)
        write_meta(tmp, **meta)
        write_json(tmp / "ladd_train_summary.json", {**summary, "config": json.loads(json.dumps(asdict(cfg)))})


def distill(cfg: DistillConfig, teacher_dir: str | Path, synthetic_dir: str | Path, tracker) -> dict:
    device = pick_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)  # all sampling on CPU: same draws on any device

    # 0. Data and networks. Prompts are encoded once; records index into the distinct ones.
    pipe = load_pipeline(teacher_dir, device)
    msl = max_sequence_length(teacher_dir)
    latents, records = load_synthetic(synthetic_dir)
    prompts = list(dict.fromkeys(records["prompt"]))
    embeds, pooled = encode_prompts(pipe, prompts, msl)
    prompt_index = torch.tensor(records["prompt"].map({p: i for i, p in enumerate(prompts)}).to_numpy())
    teacher = pipe.transformer.eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    ema = copy.deepcopy(teacher)
    layers = list(cfg.feature_layers or default_feature_layers(teacher.config.num_layers))
    disc = Discriminator(teacher, layers, cfg.head_channels).to(device)
    opt_g = torch.optim.AdamW(student.parameters(), lr=cfg.lr_g, betas=cfg.betas, weight_decay=cfg.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.lr_d, betas=cfg.betas, weight_decay=cfg.weight_decay)
    d_loss_fn, g_loss_fn = ADVERSARIAL_LOSSES[cfg.loss]
    times = student_times(cfg)
    run = _run_fingerprint(cfg, teacher_dir, synthetic_dir)
    state = dict(modules={"student": student, "ema": ema, "disc": disc}, optimizers={"opt_g": opt_g, "opt_d": opt_d},
                 generators={"data": gen})
    start = 0
    if Path(cfg.checkpoint).is_file():
        saved_step, saved_run = read_checkpoint_meta(cfg.checkpoint)
        if saved_run == run:
            start = load_checkpoint(cfg.checkpoint, **state)
            log.info("distill: resuming from %s at step %d", cfg.checkpoint, start)
        else:
            log.warning("distill: %s was written for other settings or data; starting from step 0", cfg.checkpoint)
    curve = _read_curve(_curve_path(cfg), start)
    tracker.log_params({"distill.resolved.feature_layers": layers, "distill.resolved.student_times": times.tolist()})

    def student_batch(probs):
        """Phases 1-2: teacher latents x0 with their prompts (LADD's "real" data), student times t from
        the (warm-up) probabilities, and the student input: pure noise at t = 1, x0 noised to t below
        (never noise-as-data or real images)."""
        idx = torch.randint(len(latents), (cfg.batch_size,), generator=gen)
        x0, c, p = latents[idx].to(device), embeds[prompt_index[idx]], pooled[prompt_index[idx]]
        t = times[torch.multinomial(probs, cfg.batch_size, replacement=True, generator=gen)].to(device)
        return x0, c, p, t, noise_to(x0, t, torch.randn(x0.shape, generator=gen).to(device))

    def student_x0(x_t, t, c, p):
        """x0_hat = x_t - t v (rectified flow)."""
        v = student(hidden_states=x_t, encoder_hidden_states=c, pooled_projections=p, timestep=t * 1000).sample
        return x_t - t.view(-1, 1, 1, 1) * v.float()

    skipped, step_times = 0, []
    for step in (bar := tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="distill", mininterval=2)):
        tick = time.perf_counter()
        # 1-2. A batch of teacher latents and prompts; student times from the warm-up schedule, then the
        #      biased one; the student's input at those times.
        probs = torch.tensor(cfg.warmup_probs if step < cfg.warmup_steps else cfg.probs)
        x0, c, p, t, x_t = student_batch(probs)
        # 3. Student update: x0_hat = x_t - t v, re-noised to t_hat and judged by the heads on the frozen
        #    teacher's features; the gradient flows through the teacher's forward pass into x0_hat.
        disc.requires_grad_(False)
        t_fake = logit_normal(cfg.batch_size, cfg.renoise_mean, cfg.renoise_std, gen).to(device)
        eps_fake = torch.randn(x0.shape, generator=gen).to(device)
        with autocast:
            x0_hat = student_x0(x_t, t, c, p)
            fake_features = disc.features(noise_to(x0_hat, t_fake, eps_fake), t_fake, c, p)
            loss_g = g_loss_fn(disc.heads_logits(fake_features, t_fake, p))
            noised = t < 1  # only where x_t was made from x0: at t = 1 the pairing is arbitrary
            if cfg.distill_weight > 0 and noised.any():
                target = x0[noised]
                if cfg.distill_target == "teacher":  # the frozen teacher's own x0 prediction at (x_t, t)
                    with torch.no_grad():
                        v = teacher(hidden_states=x_t[noised], encoder_hidden_states=c[noised], pooled_projections=p[noised],
                                    timestep=t[noised] * 1000).sample
                        target = x_t[noised] - t[noised].view(-1, 1, 1, 1) * v.float()
                loss_g = loss_g + cfg.distill_weight * F.mse_loss(x0_hat[noised], target)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        grad_norm_g = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        if torch.isfinite(grad_norm_g):
            opt_g.step()
            update_ema(ema, student, cfg.ema_decay)
        else:
            skipped += 1
        # 4. Discriminator update(s): real = teacher latents, fake = x0_hat, both re-noised (same t_hat
        #    unless independent_renoise); teacher features need no graph, only the heads train. The first
        #    D step reuses the G step's fake features, detached: the same x0_hat and t_hat it would draw,
        #    one teacher forward fewer per step.
        disc.requires_grad_(True)
        for k in range(cfg.d_steps_per_g):
            if k == 0:
                fake_features, t_fk = [f.detach() for f in fake_features], t_fake
            else:  # extra D steps see a fresh batch and fresh student samples
                x0, c, p, t, x_t = student_batch(probs)
                t_fk = logit_normal(cfg.batch_size, cfg.renoise_mean, cfg.renoise_std, gen).to(device)
                with torch.no_grad(), autocast:
                    x_fake = noise_to(student_x0(x_t, t, c, p), t_fk, torch.randn(x0.shape, generator=gen).to(device))
                    fake_features = disc.features(x_fake, t_fk, c, p)
            t_real = logit_normal(cfg.batch_size, cfg.renoise_mean, cfg.renoise_std, gen).to(device) if cfg.independent_renoise else t_fk
            x_real = noise_to(x0, t_real, torch.randn(x0.shape, generator=gen).to(device))
            with autocast:
                with torch.no_grad():
                    real_features = disc.features(x_real, t_real, c, p)
                real_logits = disc.heads_logits(real_features, t_real, p)
                fake_logits = disc.heads_logits(fake_features, t_fk, p)
                loss_d = d_loss_fn(real_logits, fake_logits)
                if cfg.r1_weight > 0:
                    with torch.no_grad():
                        noisy = x_real + cfg.r1_sigma * torch.randn(x_real.shape, generator=gen).to(device)
                        feats_p = disc.features(noisy, t_real, c, p)
                    loss_d = loss_d + cfg.r1_weight * approx_r1(real_logits, disc.heads_logits(feats_p, t_real, p))
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            if torch.isfinite(torch.nn.utils.clip_grad_norm_(disc.parameters(), cfg.grad_clip)):
                opt_d.step()
            else:
                skipped += 1
        step_times.append(time.perf_counter() - tick)
        # 5. Bookkeeping: curves through the tracker, atomic checkpoint (weights, optimisers, EMA, RNG, step).
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            row = {"step": step, "loss_d": loss_d.item(), "loss_g": loss_g.item(),
                   "logits_real": mean_logits(real_logits).item(), "logits_fake": mean_logits(fake_logits).item(),
                   "grad_norm_g": grad_norm_g.item(), "skipped": skipped}
            curve.append(row)
            tracker.log_metrics({f"distill/{k}": v for k, v in row.items() if k != "step"}, step=step)
            bar.set_postfix(d=f"{row['loss_d']:.3f}", g=f"{row['loss_g']:.3f}", real=f"{row['logits_real']:.2f}",
                            fake=f"{row['logits_fake']:.2f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step == cfg.steps - 1:
            save_checkpoint(cfg.checkpoint, step + 1, meta=run, **state)
            _write_curve(_curve_path(cfg), curve)

    # 6. The student pipeline (EMA weights; raw weights beside them).
    meta = {"max_sequence_length": msl, "source": "ladd-student", "teacher": run["teacher"],
            "student_times": times.tolist(), "sampler": cfg.sampler, "default_steps": len(times)}
    steady = step_times[min(5, len(step_times) - 1):] if step_times else []
    summary = {"steps": cfg.steps, "resumed_from": start, "skipped_updates": skipped,
               "sec_per_step": sum(steady) / len(steady) if steady else math.nan, "device": device.type}
    save_student(pipe, ema.to("cpu"), student.to("cpu"), cfg, meta, summary)
    tracker.log_metrics({"distill/sec_per_step": summary["sec_per_step"]} if steady else {})
    return summary
