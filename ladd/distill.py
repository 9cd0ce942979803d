"""`ladd distill`: Latent Adversarial Diffusion Distillation (Sauer et al. 2024, arXiv 2403.12015).

Student = a copy of the teacher transformer, trained at a few discrete times; discriminator = heads on
the frozen teacher's block features; real = teacher latents, fake = student x0_hat, both re-noised to
t_hat before the teacher sees them. Where recipes differ (the student's input, backward simulation,
t_hat, a regression term) the loop calls the functions of `ladd.variants` that the config names.
An inpainting teacher (`ladd.inpaint`) brings a condition per record (mask and masked-image latent, `m` below):
the student, the teacher's regression target and the teacher's features for the heads all see it beside x.
Resumable from an atomic checkpoint. Under torchrun the same loop runs on every process: each trains on its
rows of the global batch (`ladd.distributed` holds the plumbing).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tqdm.auto import tqdm

from ladd import lora
from ladd.card import write_model_card
from ladd.checkpoint import save_checkpoint, save_sharded_checkpoint
from ladd.config import DistillConfig
from ladd.curve import curve_path, curve_row, read_curve, write_curve
from ladd.data.batches import BatchSource, StudentBatch
from ladd.data.synthetic import SyntheticSet
from ladd.distributed import (
    World,
    close_world,
    full_optimizer_state,
    full_state_dict,
    full_tensor,
    init_world,
    sharded_state,
    unwrap,
)
from ladd.errors import ConfigError, StaleInput
from ladd.inpaint import has_condition
from ladd.io import atomic_dir, fingerprint, write_json
from ladd.losses import approx_r1, gan_health, heads_loss, student_loss
from ladd.networks import Networks, build_networks
from ladd.pipeline import load_pipeline, load_transformer, max_sequence_length, read_meta, write_meta
from ladd.plots import plot_curves
from ladd.recipe import Recipe
from ladd.resume import move_aside, resume_point_on_rank0, resume_state, sharded_checkpoint_path
from ladd.sampling import STOCHASTIC
from ladd.schedules import SCHEDULER_FLAGS, check_student_times, few_step_times
from ladd.training import update_ema
from ladd.variants import noise_to

log = logging.getLogger(__name__)


def student_times(cfg: DistillConfig) -> torch.Tensor:
    """The training times, exactly as the saved student's diffusers schedule computes them."""
    return torch.tensor(
        few_step_times(cfg.schedule, len(cfg.student_times), cfg.student_times[-1]), dtype=torch.float32
    )


def memory_plan(cfg: DistillConfig, device: torch.device) -> dict:
    """The memory settings resolved for `device`: "auto" means on for CUDA, off on the CPU."""
    cuda = device.type == "cuda"
    return {
        "gradient_checkpointing": ("all" if cuda else "off")
        if cfg.gradient_checkpointing == "auto"
        else cfg.gradient_checkpointing,
        "mixed_precision": ("bf16" if cuda else "no") if cfg.mixed_precision == "auto" else cfg.mixed_precision,
        "teacher_dtype": ("bfloat16" if cuda else "float32") if cfg.teacher_dtype == "auto" else cfg.teacher_dtype,
        "ema_on_cpu": cfg.ema_on_cpu,
        "truncate_teacher": cfg.truncate_teacher,
    }


def _run_fingerprint(cfg: DistillConfig, teacher_dir, synthetic_dir) -> dict:
    """What a checkpoint must match to be resumed (training length and bookkeeping may change)."""
    skip = {
        "out_dir",
        "checkpoint",
        "report_dir",
        "steps",
        "checkpoint_every",
        "log_every",
        "device",
        "ema_on_cpu",
        "prefetch",
        "gradient_checkpointing",
        "truncate_teacher",
        "parallel",
    }
    run = {k: v for k, v in asdict(cfg).items() if k not in skip}
    run = {**run, "teacher": fingerprint(teacher_dir), "synthetic": fingerprint(Path(synthetic_dir) / "manifest.json")}
    return json.loads(json.dumps(run))  # as stored in the checkpoint (tuples become lists)


def trajectory_columns(stored_times: list[float], times: torch.Tensor) -> list[int]:
    """Which of the stored teacher path states are the student's times below 1 (in order)."""
    columns = []
    for t in times[1:].tolist():
        match = [i for i, s in enumerate(stored_times) if abs(s - t) < 1e-6]
        if not match:
            raise ConfigError(
                f"distill.student_input=trajectory needs the teacher's path at t={t:.10g}, but the "
                f"synthetic data holds {stored_times}: set synthesize.trajectory_times to the student's "
                "times below 1 and rerun synthesize"
            )
        columns.append(match[0])
    return columns


def check_synthetic(data: SyntheticSet, teacher_fingerprint: str, teacher_dir, teacher_config) -> bool:
    """Before any work: the synthetic set was made by this teacher (its latents, and the text embeddings distill
    reads instead of running text encoders, at the teacher's T5 length and widths), for the teacher's task.
    Returns whether records carry an inpainting condition."""
    wanted = has_condition(teacher_config.in_channels, teacher_config.out_channels or teacher_config.in_channels)
    if ("condition" in data.manifest["record_tensors"]) != wanted:
        raise ConfigError(
            f"{data.out} was synthesized {'without' if wanted else 'with'} inpainting conditions, "
            f"and the teacher {'is' if wanted else 'is not'} an inpainting model: rerun `ladd synthesize` "
            "with this inpaint.enabled"
        )
    msl, text = max_sequence_length(teacher_dir), data.text
    widths = (teacher_config.joint_attention_dim, teacher_config.pooled_projection_dim)
    if text["max_sequence_length"] != msl or (text["prompt_embeds"][-1], text["pooled_prompt_embeds"][-1]) != widths:
        raise StaleInput(
            f"{data.manifest_path}: its text embeddings are [{', '.join(map(str, text['prompt_embeds']))}] "
            f"at T5 length {text['max_sequence_length']}, the teacher's are [.., {widths[0]}] at "
            f"{msl} (teacher.max_sequence_length): rerun `ladd synthesize`"
        )
    if data.manifest["run"]["teacher"] != teacher_fingerprint:
        raise StaleInput(
            f"{data.manifest_path} was synthesized by another teacher ({data.manifest['run']['teacher']}; "
            f"{teacher_dir} is {teacher_fingerprint}): rerun `ladd synthesize`"
        )
    return wanted


def save_student(
    teacher_dir,
    student_ema,
    student_raw,
    cfg: DistillConfig,
    meta: dict,
    summary: dict,
    adapter: dict | None = None,
    lora_spec: lora.LoraSpec | None = None,
) -> None:
    """A complete diffusers pipeline: the teacher's VAE, tokenizers and text encoders (read again from its
    folder), the EMA student transformer, and a few-step scheduler that stock diffusers runs at any step
    count: `cfg.schedule`'s sigmas from 1 to the smallest training time (k = 1, 2 and n steps visit trained
    times), re-noising between steps like `ladd.sampling.sample_renoise`. A model card beside it; a LoRA
    student's EMA adapter too, which stock diffusers loads onto the teacher."""
    times = student_times(cfg).tolist()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0,
        stochastic_sampling=STOCHASTIC[cfg.sampler],
        **{SCHEDULER_FLAGS[cfg.schedule]: len(times) > 1},
    )
    # read by diffusers' exponential/beta conversions (not __init__ arguments: it warns that it ignores them,
    # and uses them)
    scheduler.register_to_config(sigma_min=min(times), sigma_max=1.0)
    pipe = load_pipeline(teacher_dir, "cpu", transformer=student_ema, scheduler=scheduler)
    with atomic_dir(cfg.out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        student_raw.save_pretrained(tmp / "ladd_raw_transformer", safe_serialization=True)
        if adapter is not None and lora_spec is not None:
            lora.save_adapter(tmp, adapter, lora_spec)
        write_meta(tmp, **meta)
        write_json(tmp / "ladd_train_summary.json", {**summary, "config": json.loads(json.dumps(asdict(cfg)))})
        write_model_card(tmp, meta, summary)


def run_report_path(cfg: DistillConfig) -> Path:
    """How the last run went (timings, device, processes, resume): a small report DVC reads as metrics, kept in
    git beside the curve, outside the student's hash."""
    return Path(cfg.report_dir) / "distill.json"


def save_run(
    cfg: DistillConfig,
    teacher_dir,
    nets: Networks,
    world: World,
    meta: dict,
    summary: dict,
    facts: dict,
    curve: list[dict],
    tracker,
    lora_spec: lora.LoraSpec | None = None,
) -> None:
    """Gather what trained and its EMA (collective under FSDP); then, on rank 0, the student pipeline with
    `summary` (a LoRA student fused into fp32 copies of the teacher), the run report with `facts`, the curves
    image, and MLflow's copies of them."""
    sharded = cfg.parallel == "fsdp" and world.size > 1
    ema_state, student_state = full_state_dict(nets.ema), full_state_dict(nets.trained)
    if world.main:
        adapter = None
        if lora_spec is not None:
            ema_out, adapter = lora.fused_student(teacher_dir, lora_spec, ema_state)
            raw_out, _ = lora.fused_student(teacher_dir, lora_spec, student_state)
        else:
            ema_out, raw_out = (
                (load_transformer(teacher_dir), load_transformer(teacher_dir))
                if sharded
                else (nets.ema, unwrap(nets.trained))
            )
            ema_out.load_state_dict(ema_state)
            raw_out.load_state_dict(student_state)
        save_student(teacher_dir, ema_out.to("cpu"), raw_out.to("cpu"), cfg, meta, summary, adapter, lora_spec)
        write_json(run_report_path(cfg), facts)
        health = summary["gan_health"]
        curves_png = plot_curves(
            curve,
            len(nets.layers),
            curve_path(cfg.report_dir).with_suffix(".png"),
            health["summary"],
            health.get("chance_loss"),
            meta["student_times"],
        )
        tracker.log_metrics({f"distill/health/{k}": v for k, v in health.items() if isinstance(v, (int, float))})
        tracker.set_tags({"distill.gan_health": health["status"]})
        tracker.log_artifact(curves_png, "distill")
        if math.isfinite(facts["sec_per_step"]):
            tracker.log_metrics({"distill/sec_per_step": facts["sec_per_step"]})
    world.barrier()  # the stage ends on every rank once the student is written


def distill(cfg: DistillConfig, teacher_dir: str | Path, synthetic_dir: str | Path, tracker) -> dict:
    check_student_times(cfg.schedule, cfg.student_times)
    world = init_world(cfg.device)
    try:
        return _distill(cfg, teacher_dir, synthetic_dir, tracker, world)
    finally:
        close_world(world)


# --- the loop's phases 3 and 4 --------------------------------------------------------------------------------


class StudentStep(NamedTuple):
    loss_g: torch.Tensor
    loss_adv: torch.Tensor
    loss_reg: torch.Tensor
    grad_norm: torch.Tensor
    skipped: int  # 1 when the gradient was not finite and the update was skipped
    fake_features: list | None  # the judged rows' teacher features of x0_hat (the first D step reuses them)
    t_fake: torch.Tensor
    judged: torch.Tensor


def student_update(cfg, recipe: Recipe, nets: Networks, source: BatchSource, batch: StudentBatch, autocast):
    """Phase 3: x0_hat = x_t - t v, re-noised to t_hat and judged by the heads on the frozen teacher's features (the
    rows whose time has an adversarial weight); the gradient flows through the teacher's forward pass into x0_hat.
    Plus the optional regression term. One optimiser step and the EMA update (skipped on a non-finite gradient)."""
    x0, c, p, m, t_all, x_t, simulated, k = batch
    t = t_all[source.mine]
    nets.disc.requires_grad_(False)
    t_fake = recipe.t_hat(t_all, source.gen)[source.mine]
    eps_fake = source.noise(x0)
    weight = recipe.adversarial_weights[k]
    judged = weight > 0
    fake_features = None
    with autocast:
        x0_hat = nets.student_x0(x_t, t, c, p, m)
        loss_reg = recipe.regression_loss(nets, source.world, x0_hat, x0, x_t, t, c, p, m, simulated)
        loss_adv = x0_hat.sum() * 0
        if judged.any():
            fake_features = nets.judged_features(x0_hat, t_fake, eps_fake, judged, c, p, m)
            logits = nets.disc.heads_logits(fake_features, t_fake[judged], p[judged])
            loss_adv = student_loss(recipe.adversarial, logits, weight[judged], len(weight))
        loss_g = loss_adv + loss_reg
    nets.opt_g.zero_grad(set_to_none=True)
    loss_g.backward()  # DDP / FSDP average the student's gradient over the ranks here
    grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(nets.trained.parameters(), cfg.grad_clip))
    finite = bool(torch.isfinite(grad_norm))
    if finite:
        nets.opt_g.step()
        update_ema(nets.ema, unwrap(nets.trained), cfg.ema_decay)
    return StudentStep(loss_g, loss_adv, loss_reg, grad_norm, int(not finite), fake_features, t_fake, judged)


class HeadsStep(NamedTuple):
    real_logits: list
    fake_logits: list
    judged_k: torch.Tensor  # the step indices of the rows the last D step judged
    skipped: int


def heads_update(
    cfg, recipe: Recipe, nets: Networks, source: BatchSource, batch: StudentBatch, g: StudentStep, probs, autocast
) -> HeadsStep:
    """Phase 4, `d_steps_per_g` discriminator updates: real = teacher latents, fake = x0_hat, both re-noised (same
    t_hat unless independent_renoise); teacher features need no graph, only the heads train. The first D step
    reuses the G step's fake features, detached: the same x0_hat and t_hat it would draw, one teacher forward fewer
    per step. Extra D steps see a fresh batch and fresh student samples."""
    x0, c, p, m, t_all, x_t, _, k = batch
    mine, disc, skipped, judged = source.mine, nets.disc, 0, g.judged
    real_logits: list = []
    fake_logits: list = []
    disc.requires_grad_(True)
    for d_step in range(cfg.d_steps_per_g):
        if d_step == 0:
            fake_features, t_fk = g.fake_features and [f.detach() for f in g.fake_features], g.t_fake
        else:
            x0, c, p, m, t_all, x_t, _, k = source.next(probs)
            judged = recipe.adversarial_weights[k] > 0
            t_fk = recipe.t_hat(t_all, source.gen)[mine]
            eps_fake = source.noise(x0)
            with torch.no_grad(), autocast:
                x0_hat = nets.student_x0(x_t, t_all[mine], c, p, m)
                fake_features = nets.judged_features(x0_hat, t_fk, eps_fake, judged, c, p, m) if judged.any() else None
        t_real = recipe.t_hat(t_all, source.gen)[mine] if cfg.independent_renoise else t_fk
        eps_real = source.noise(x0)
        real_logits = fake_logits = []
        if fake_features:
            with autocast:
                with torch.no_grad():
                    real_features = nets.judged_features(x0, t_real, eps_real, judged, c, p, m)
                real_logits = disc.heads_logits(real_features, t_real[judged], p[judged])
                fake_logits = disc.heads_logits(fake_features, t_fk[judged], p[judged])
                loss_d = heads_loss(recipe.adversarial, real_logits, fake_logits)
                if cfg.r1_weight > 0:
                    with torch.no_grad():
                        noisy = noise_to(x0, t_real, eps_real)[judged] + cfg.r1_sigma * source.noise(x0)[judged]
                        feats_p = disc.features(noisy, t_real[judged], c[judged], p[judged], m[judged])
                    loss_d = loss_d + cfg.r1_weight * approx_r1(
                        real_logits, disc.heads_logits(feats_p, t_real[judged], p[judged])
                    )
            nets.opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
        else:  # no judged row on this rank: zero gradients, so the ranks' heads stay equal
            nets.opt_d.zero_grad(set_to_none=True)
        source.world.average_gradients(disc.parameters())  # the heads are replicated on every rank
        if torch.isfinite(torch.nn.utils.clip_grad_norm_(disc.parameters(), cfg.grad_clip)):
            nets.opt_d.step()
        else:
            skipped += 1
    return HeadsStep(real_logits, fake_logits, k[judged], skipped)


# --- the run ------------------------------------------------------------------------------------------------


def _distill(cfg: DistillConfig, teacher_dir, synthetic_dir, tracker, world: World) -> dict:
    started, device = time.perf_counter(), world.device
    if world.size > 1 and cfg.parallel == "none":
        raise ConfigError(f"distill.parallel is none but torchrun started {world.size} processes: use ddp or fsdp")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    plan = memory_plan(cfg, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=plan["mixed_precision"] == "bf16")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)  # on CPU, the same on every rank: same draws on any device and world

    # 0. Data and networks: teacher latents by bucket (and its path states where the input reads them), the
    #    prompts' stored embeddings, the frozen teacher (may be bf16), student, EMA, heads; resumed where this run's.
    times = student_times(cfg)
    recipe = Recipe.of(cfg, len(times), device)
    lora_spec = None  # a LoRA target that matches no layer fails here, on the teacher's config alone
    if cfg.student == "lora":
        lora_spec = lora.LoraSpec.resolve(
            teacher_dir, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, "distill.lora_targets"
        )
    run = _run_fingerprint(cfg, teacher_dir, synthetic_dir)
    data = SyntheticSet(synthetic_dir)  # the manifest and a few records columns; every shard stat-ed, none read
    columns = trajectory_columns(data.trajectory_times, times) if recipe.student_input.reads_path else None
    teacher = load_transformer(teacher_dir, device, getattr(torch, plan["teacher_dtype"]))
    teacher = teacher.eval().requires_grad_(False)
    inpainting = check_synthetic(data, run["teacher"], teacher_dir, teacher.config)
    # before training: a checkpoint past distill.steps is an error; one of other settings moves aside when this
    # run writes its first checkpoint (a run failing before that changes no file)
    resume, asides = resume_point_on_rank0(cfg.checkpoint, cfg.steps, run, world)
    nets = build_networks(cfg, teacher_dir, teacher, plan, world, lora_spec)
    start = resume_state(resume, *nets.checkpointed(), gen, world) if resume else 0
    curve = read_curve(curve_path(cfg.report_dir), start)
    n_trained = _log_start(cfg, plan, nets, data, synthetic_dir, times, tracker)
    skipped, step_times, to_first_step = 0, [], time.perf_counter() - started
    source = BatchSource(cfg, data, times, columns, inpainting, world, gen, recipe, nets, autocast, start)
    try:
        steps = range(start, cfg.steps)
        for step in (
            bar := tqdm(steps, initial=start, total=cfg.steps, desc="distill", mininterval=2, disable=not world.main)
        ):
            tick = time.perf_counter()
            # 1-2. A batch of teacher latents and prompts; student times from the warm-up schedule, then the
            #      biased one; the student's input at those times.
            probs = torch.tensor(cfg.warmup_probs if step < cfg.warmup_steps else cfg.probs)
            batch = source.next(probs)
            # 3. Student update: x0_hat re-noised to t_hat and judged by the heads (+ the regression term).
            g = student_update(cfg, recipe, nets, source, batch, autocast)
            # 4. Discriminator update(s) on real and fake re-noised alike.
            d = heads_update(cfg, recipe, nets, source, batch, g, probs, autocast)
            skipped += g.skipped + d.skipped
            step_times.append(time.perf_counter() - tick)
            # 5. Bookkeeping: curves (per head and per student time too, over every rank's rows) through the
            #    tracker, atomic checkpoint (weights, optimisers, EMA, RNG, step).
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                row = curve_row(
                    world,
                    recipe.adversarial,
                    len(nets.layers),
                    len(times),
                    d.judged_k,
                    d.real_logits,
                    d.fake_logits,
                    g.loss_g,
                    g.loss_adv,
                    g.loss_reg,
                    g.grad_norm,
                )
                curve.append(row := {"step": step, **row, "skipped": skipped})
                tracker.log_metrics(
                    {f"distill/{k}": v for k, v in row.items() if k != "step" and math.isfinite(v)}, step=step
                )
                bar.set_postfix(
                    d=f"{row['loss_d']:.3f}",
                    g=f"{row['loss_adv']:.3f}",
                    real=f"{row['logits_real']:.2f}",
                    fake=f"{row['logits_fake']:.2f}",
                )
            if (step + 1) % cfg.checkpoint_every == 0 or step == cfg.steps - 1:
                save_state(cfg, step + 1, nets, gen, run, world, asides, curve, len(times))
    finally:
        source.close()

    # 6. GAN health over the last quarter of training; what the weights are (versioned with the student) apart
    #    from how this run went (timings, device, resume: a cache-free report beside the checkpoint).
    health = gan_health(curve, cfg.loss, len(nets.layers), len(times))
    (log.info if health["status"] == "ok" else log.warning)("distill: GAN health %s", health["summary"])
    summary = {"steps": cfg.steps, "skipped_updates": skipped, "gan_health": health}
    facts = _run_facts(cfg, world, nets, start, step_times, to_first_step, n_trained)
    meta = _student_meta(cfg, teacher_dir, data, run, times, inpainting, lora_spec, n_trained)
    save_run(cfg, teacher_dir, nets, world, meta, summary, facts, curve, tracker, lora_spec)
    return {**summary, **facts}


def save_state(cfg: DistillConfig, step: int, nets: Networks, gen, run: dict, world: World, asides, curve, n_times):
    """The resume point at `step`: under FSDP a sharded checkpoint (every rank writes its shards, collective); else
    gathered and written from rank 0 as one file. Then the curve so far."""
    if world.main:
        move_aside(asides)  # another run's checkpoint, kept whole, only now that this run writes its own
    modules, optimizers = nets.checkpointed()
    if cfg.parallel == "fsdp" and world.size > 1:
        save_sharded_checkpoint(
            sharded_checkpoint_path(cfg.checkpoint),
            step,
            {
                "student": sharded_state(nets.student),
                "ema": sharded_state(nets.ema),
                "opt_g": sharded_state(nets.student, nets.opt_g),
            },
            {"disc": nets.disc.state_dict()},
            {"opt_d": nets.opt_d.state_dict()},
            {"data": gen},
            run,
            world,
        )
    else:
        states = {name: full_state_dict(module) for name, module in modules.items()}
        opt_states = {name: full_optimizer_state(module, opt) for name, (module, opt) in optimizers.items()}
        if world.main:
            save_checkpoint(cfg.checkpoint, step, states, opt_states, {"data": gen}, meta=run)
    if world.main:
        write_curve(curve_path(cfg.report_dir), curve, len(nets.layers), n_times)


def _log_start(cfg: DistillConfig, plan: dict, nets: Networks, data, synthetic_dir, times, tracker) -> int:
    """What this run resolved, to the tracker and the log; returns the trained parameter count."""
    tracker.log_params(
        {
            "distill.resolved.feature_layers": nets.layers,
            "distill.resolved.student_times": times.tolist(),
            **{f"distill.resolved.{k}": v for k, v in plan.items()},
        }
    )
    n_trained = sum(p.numel() for p in nets.trained.parameters())  # a DTensor shard counts its whole parameter
    log.info(
        "distill: %d records in %d resolution buckets %s, read from %s as it trains; memory: %s; %s student, "
        "%.3g M trained parameters",
        len(data),
        len(data.buckets),
        synthetic_dir,
        [list(b.resolution) for b in data.buckets],
        plan,
        cfg.student,
        n_trained / 1e6,
    )
    log.info(
        "distill: %s inputs, backward share %.2f, %s re-noising, regression %s x%g (t = 1: x%g)%s",
        cfg.student_input,
        cfg.backward_share,
        cfg.renoise_times,
        cfg.regression_target,
        cfg.regression_weight,
        cfg.regression_weight_one,
        f", preset {cfg.preset}" if cfg.preset else "",
    )
    return n_trained


def _run_facts(cfg, world: World, nets: Networks, start: int, step_times, to_first_step, n_trained) -> dict:
    """How this run went (the run report, outside the student's hash): resume point, speed, device, processes."""
    steady = step_times[min(5, len(step_times) - 1) :] if step_times else []
    facts = {
        "resumed_from": start,
        "sec_per_step": sum(steady) / len(steady) if steady else math.nan,
        "seconds_to_first_step": to_first_step,
        "device": world.device.type,
        "world_size": world.size,
        "parallel": cfg.parallel if world.size > 1 else "none",
        "trained_parameters": n_trained,
    }
    if world.device.type == "cuda":  # this rank's peak: weights, optimiser states, activations; allocator slack not
        facts["peak_memory_gb"] = torch.cuda.max_memory_allocated(world.device) / 1e9
    if world.size > 1:
        sharded = cfg.parallel == "fsdp"
        world.check_replicas(nets.disc)
        if not sharded:
            world.check_replicas(unwrap(nets.student))
        facts["replicas"] = f"{'student and heads' if not sharded else 'heads'} identical on {world.size} ranks"
    return facts


def _student_meta(cfg, teacher_dir, data, run: dict, times, inpainting: bool, lora_spec, n_trained: int) -> dict:
    """What the student is (ladd.json beside it): its times, schedule and sampler, its task, its teacher and the
    teacher settings and resolution buckets evaluate measures it against."""
    meta = {
        "max_sequence_length": data.text["max_sequence_length"],
        "source": "ladd-student",
        "teacher": run["teacher"],
        "base_model": read_meta(teacher_dir).get("source", str(teacher_dir)),
        "student_times": times.tolist(),
        "schedule": cfg.schedule,
        "sampler": cfg.sampler,
        "default_steps": len(times),
        "task": "inpaint" if inpainting else "text2image",
        "distillation_teacher": {"guidance": data.manifest["run"]["guidance"], "steps": data.manifest["run"]["steps"]},
        "buckets": [
            {"resolution": b["resolution"], "share": b["records"] / data.manifest["records"]}
            for b in data.manifest["buckets"]
        ],
    }
    if lora_spec is not None:
        meta["lora"] = {
            "rank": lora_spec.rank,
            "alpha": lora_spec.alpha,
            "target_modules": list(lora_spec.targets),
            "parameters": n_trained,
        }
    return meta
