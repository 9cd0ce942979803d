"""`ladd align`: the preference stage after distillation (LADD's DPO-LoRA, Sauer et al. 2024 sec. 4).

Candidates from the student at its own few steps, scored by a reward of the `REWARDS` registry, best vs worst
per prompt (with a minimum margin, checked by a Great Expectations suite), then a LoRA trained on the student
with Diffusion-DPO (Wallace et al. 2024) written for rectified flow: x_t = (1 - t) x0 + t eps, velocity target
u = eps - x0; per pair the policy's squared velocity error minus the frozen reference's, for the winner (w) and
the loser (l), L = -log sigma(-beta (Delta_w - Delta_l)), at the student's own times. With a LoRA policy the
reference is the same module with its adapters off (`ladd.lora`): no second copy of the student is held.

`align.enabled: false` makes the stage a pass-through (its folder says so), and evaluate/export use the student.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch
import torch.nn.functional as F

from ladd.errors import ConfigError, ValidationFailed
from ladd.variants import noise_to

log = logging.getLogger(__name__)
PASS_THROUGH = "ladd_align_disabled.json"  # the stage's whole output when align.enabled is false
SUMMARY = "ladd_align_summary.json"


def velocity_error(v: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Per sample mean of (v - (eps - x0))^2."""
    return (v.float() - (eps - x0)).pow(2).flatten(1).mean(1)


def dpo_loss(
    policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss, the implicit reward accuracy: the share of pairs where the policy already prefers the winner)
    from per-pair velocity errors of winner (w) and loser (l) under the policy and the reference."""
    margin = (policy_w - ref_w) - (policy_l - ref_l)
    return -F.logsigmoid(-beta * margin).mean(), (margin < 0).float().mean()


class Reward(NamedTuple):
    """`load(path, classifier_dir, key)` -> score(images in [0, 1] [B, 3, H, W], prompts, labels) -> [B]."""

    load: Callable
    needs_labels: bool


def _classifier_reward(path, classifier_dir, key):
    from ladd.quality import load_classifier_features

    model = load_classifier_features(classifier_dir, key)

    @torch.no_grad()
    def score(images, prompts, labels):
        logits = model(images)[1]  # (features, logits)
        return logits.softmax(-1).gather(1, torch.as_tensor(labels).view(-1, 1)).squeeze(1).float()

    return score


def _clip_reward(path, classifier_dir, key):
    from ladd.quality import load_clip

    if not path:
        raise ConfigError(f"{key}: clip needs align.reward_path (a local CLIP model folder)")
    clip = load_clip(path, "align.reward_path")

    @torch.no_grad()
    def score(images, prompts, labels):
        return 100 * (clip.image_embeds(images) * clip.text_embeds(list(prompts))).sum(-1)

    return score


# name -> Reward. A scorer of its own (PickScore, ImageReward, HPS-style): a loader from a local folder returning
# score(images, prompts, labels), added here.
REWARDS: dict[str, Reward] = {
    "classifier": Reward(_classifier_reward, needs_labels=True),  # probability of the prompted digit
    "clip": Reward(_clip_reward, needs_labels=False),  # CLIP score, from a local CLIP folder
}


def load_reward(name: str, path: str | Path | None, classifier_dir, key: str = "align.reward"):
    if name not in REWARDS:
        raise ConfigError(f"{key} must be one of {tuple(REWARDS)}, got {name!r}")
    return REWARDS[name].load(path, classifier_dir, key)


class _Rows:
    """Rows [start, start + len(rows)) of a sequence whose other rows are not held (only slicing and len)."""

    def __init__(self, rows: torch.Tensor, start: int):
        self.rows, self.start = rows, start

    def __len__(self) -> int:
        return self.start + len(self.rows)

    def __getitem__(self, index: slice) -> torch.Tensor:
        return self.rows[index.start - self.start : index.stop - self.start]


def generate_batch(transformer, start: int, embeds, pooled, noise, sigmas, batch_size: int, condition=None, **kwargs):
    """`ladd.generate.generate_latents` on the one batch of rows [start, start + len(noise)) (`start` a multiple of
    `batch_size`), sampled exactly as among all the rows: generate_latents seeds a batch's `renoise` noise by its first
    row's index, so the batch is handed over at its own rows (and `share` starts there); no other row need exist.
    (A first-row argument to generate_latents, added to that seed, would make `_Rows` unnecessary.)"""
    from ladd.generate import generate_latents

    def at(rows):
        return None if rows is None else _Rows(rows, start)

    return generate_latents(
        transformer,
        at(embeds),
        at(pooled),
        at(noise),
        sigmas,
        batch_size=batch_size,
        share=(start // batch_size, 1),
        condition=at(condition),
        **kwargs,
    )


@torch.no_grad()
def sample_and_score(
    transformer, vae, meta: dict, encode, prompts: list[str], labels, score, seed: int, steps: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One candidate per prompt from the student at `steps` steps (its schedule and sampler), record i from seed
    `seed * 1_000_003 + i`, batch by batch: its prompts encoded (`encode(prompts)` -> (embeds, pooled)), sampled,
    decoded and scored (no image or embedding is kept): (latents on the CPU, rewards [P])."""
    from ladd.generate import record_noise
    from ladd.pipeline import decode_latents
    from ladd.schedules import student_sigmas

    cfg = transformer.config
    shape = (cfg.out_channels or cfg.in_channels, cfg.sample_size, cfg.sample_size)
    sigmas = student_sigmas(steps, meta)
    latents, rewards = [], []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        noise = record_noise([seed * 1_000_003 + j for j in range(i, i + len(batch))], shape)
        latents.append(
            generate_batch(
                transformer,
                i,
                *encode(batch),
                noise,
                sigmas,
                batch_size,
                sampler=meta.get("sampler", "renoise"),
                seed=seed,
            )
        )
        images = decode_latents(vae, latents[-1], batch_size).cpu()
        rewards.append(score(images, batch, None if labels is None else labels[i : i + batch_size]))
    return torch.cat(latents), torch.cat(rewards).float().cpu()


def preference_pairs(rewards: torch.Tensor, min_margin: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per prompt (row of `rewards` [P, S]) its best and worst sample: (prompt index, winner, loser) of the pairs
    whose reward margin is at least `min_margin`."""
    (high, best), (low, worst) = rewards.max(1), rewards.min(1)
    keep = torch.nonzero(high - low >= min_margin).squeeze(1)
    return keep, best[keep], worst[keep]


def pairs_frame(ids, prompts: list[str], rewards: torch.Tensor, keep, winner, loser) -> pd.DataFrame:
    """One row per prompt: its candidates' rewards (finite?), and for the pairs kept the winner's and loser's."""
    frame = pd.DataFrame(
        {
            "id": [str(i) for i in ids],
            "prompt": prompts,
            "finite": torch.isfinite(rewards).all(1).tolist(),
            "paired": 0,
            "reward_winner": float("nan"),
            "reward_loser": float("nan"),
        }
    )
    k = keep.tolist()
    frame.loc[k, "paired"] = 1
    frame.loc[k, "reward_winner"] = rewards[keep, winner].tolist()
    frame.loc[k, "reward_loser"] = rewards[keep, loser].tolist()
    frame["margin"] = frame["reward_winner"] - frame["reward_loser"]
    return frame


def pair_checks(min_pairs: int, min_margin: float) -> list:
    from ladd.data.validation import Check

    return [
        Check("ExpectColumnValuesToBeInSet", {"column": "finite", "value_set": [True]}),  # no NaN reward
        Check("ExpectColumnSumToBeBetween", {"column": "paired", "min_value": min_pairs}),  # enough pairs
        Check("ExpectColumnValuesToBeBetween", {"column": "margin", "min_value": min_margin}),
    ]  # NaN (unpaired) skipped


def student_time_weights(cfg, student_dir) -> list[float]:
    """align.time_weights, or the student's training distribution over its times (distill.probs, from its
    ladd_train_summary.json; equal weights without one): DPO moves the student where it was trained."""
    from ladd.pipeline import read_meta

    times = read_meta(student_dir)["student_times"]
    weights = cfg.time_weights
    if weights is None:
        summary = Path(student_dir) / "ladd_train_summary.json"
        weights = json.loads(summary.read_text())["config"].get("probs") if summary.is_file() else None
        weights = weights if weights and len(weights) == len(times) else [1.0] * len(times)
    if len(weights) != len(times):
        raise ConfigError(f"align.time_weights must hold one weight per student time {times}, got {list(weights)}")
    return list(weights)


def train_dpo(
    transformer,
    layers,
    weights,
    x_w,
    x_l,
    prompts: list[str],
    encode,
    times: torch.Tensor,
    time_weights: list[float],
    cfg,
    autocast,
    probe=None,
    tracker=None,
) -> list[dict]:
    """`cfg.train_steps` AdamW steps on the LoRA `weights` with `dpo_loss` on the pairs (winner latents x_w, loser
    x_l, their `prompts`, a step's encoded by `encode(prompts)` -> (embeds, pooled)), t drawn from the student's `times`
    by `time_weights`, winner and loser sharing t and eps (Diffusion-DPO's pairing); the reference is the same module
    with the adapters off. `probe()` -> the reward of fresh samples, every `cfg.probe_every` steps. Returns the curve
    rows."""
    from ladd import lora

    device = next(transformer.parameters()).device
    opt = torch.optim.AdamW(weights.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    time_weights = torch.tensor(time_weights, dtype=torch.float)
    curve = []

    def errors(x0, eps, t, c, p):
        x_t = noise_to(x0, t, eps)

        def v():
            with autocast:
                return transformer(
                    hidden_states=x_t, encoder_hidden_states=c, pooled_projections=p, timestep=t * 1000
                ).sample

        with lora.adapters(layers, on=True):
            policy = velocity_error(v(), x0, eps)
        with torch.no_grad():
            ref = velocity_error(v(), x0, eps)
        return policy, ref

    for step in range(cfg.train_steps + 1):
        row = {"step": step}
        if probe is not None and (step % cfg.probe_every == 0 or step == cfg.train_steps):
            row["probe_reward"] = probe()
        if step < cfg.train_steps:
            idx = torch.randint(len(x_w), (cfg.batch_size,), generator=gen)
            t = times[torch.multinomial(time_weights, cfg.batch_size, replacement=True, generator=gen)].to(device)
            eps = torch.randn(x_w[idx].shape, generator=gen).to(device)
            c, p = (e.to(device) for e in encode([prompts[k] for k in idx.tolist()]))
            (pw, rw), (pl, rl) = (errors(x[idx].to(device), eps, t, c, p) for x in (x_w, x_l))
            loss, accuracy = dpo_loss(pw, pl, rw, rl, cfg.beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(weights.parameters(), 1.0)
            opt.step()
            row.update(loss=float(loss.detach()), implicit_accuracy=float(accuracy))
        curve.append(row)
        if tracker is not None:
            tracker.log_metrics({f"align/{k}": v for k, v in row.items() if k != "step"}, step=step)
        if step % max(1, cfg.train_steps // 10) == 0 and "loss" in row:
            log.info(
                "align step %d/%d: DPO loss %.4f, implicit accuracy %.2f%s",
                step,
                cfg.train_steps,
                row["loss"],
                row["implicit_accuracy"],
                f", fresh-sample reward {row['probe_reward']:.4f}" if "probe_reward" in row else "",
            )
    return curve


def align_stage(cfg, data_dir, classifier_dir, student_dir, report_dir, tracker) -> dict:
    """The stage: a pass-through when `cfg.enabled` is false; else candidates, rewards, pairs (their suite), the
    DPO-LoRA, and `cfg.out_dir` replaced atomically by the aligned pipeline, its adapter, card, curve and summary.
    Bad settings fail before any sampling, too few pairs before training; `models/` is untouched by a failure."""
    from ladd import lora
    from ladd.card import write_model_card
    from ladd.data.prepare import load_split
    from ladd.data.validation import run_suite
    from ladd.io import atomic_dir, write_json
    from ladd.pipeline import encode_prompts, load_pipeline, pick_device, read_meta, write_meta
    from ladd.plots import plot_align_curve

    out = Path(cfg.out_dir)
    if not cfg.enabled:
        with atomic_dir(out) as tmp:
            write_json(
                tmp / PASS_THROUGH,
                {"enabled": False, "note": "align.enabled is false: evaluate and export use the distilled student"},
            )
        write_json(Path(report_dir) / "align_pairs.json", {"suite": "align_pairs", "enabled": False})  # DVC's output
        return {"enabled": False}
    start = time.perf_counter()
    score = load_reward(cfg.reward, cfg.reward_path, classifier_dir)  # a bad reward fails before any sampling
    # the DPO adapter (no dropout: align has no such setting); a target matching no layer fails here
    spec = lora.LoraSpec.resolve(
        student_dir, cfg.lora_rank, cfg.lora_alpha, 0.0, cfg.lora_targets, "align.lora_targets"
    )
    time_weights = student_time_weights(cfg, student_dir)
    train = load_split(Path(data_dir) / "train")
    n = min(cfg.prompts or len(train.captions), len(train.captions))
    prompts, ids = list(train.captions["prompt"][:n]), list(train.captions["id"][:n])
    labels = train.labels[:n].tolist() if REWARDS[cfg.reward].needs_labels else None
    device = pick_device(cfg.device)
    bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    pipe, meta = load_pipeline(student_dir, device), read_meta(student_dir)

    # prompts are encoded batch by batch, when sampled or trained on: all at once, an SD3.5 student's embeddings
    # take 5.5 MB a prompt (10^5 prompts: 550 GB); the text encoders stay loaded for it
    def encode(batch):
        with torch.autocast(device.type, enabled=False):  # in full precision, as the pipeline encodes them
            return encode_prompts(pipe, batch, meta["max_sequence_length"])

    def candidates(seed, count):  # adapters as they are: off before training, so these are the student's
        with autocast:
            return sample_and_score(
                pipe.transformer,
                pipe.vae,
                meta,
                encode,
                prompts[:count],
                None if labels is None else labels[:count],
                score,
                seed,
                cfg.steps,
                cfg.sample_batch_size,
            )

    sampled = [candidates(cfg.seed * cfg.samples + j, n) for j in range(cfg.samples)]
    latents, rewards = torch.stack([s[0] for s in sampled], 1), torch.stack([s[1] for s in sampled], 1)
    sampling_s = time.perf_counter() - start
    keep, winner, loser = preference_pairs(rewards, cfg.min_margin)
    log.info(
        "align: %d candidates (%d prompts x %d), mean reward %.4f; %d pairs with margin >= %g",
        rewards.numel(),
        n,
        cfg.samples,
        float(rewards.nanmean()),
        len(keep),
        cfg.min_margin,
    )
    try:
        run_suite(
            "align_pairs",
            pairs_frame(ids, prompts, rewards, keep, winner, loser),
            pair_checks(cfg.min_pairs, cfg.min_margin),
            report_dir,
        )
    except ValidationFailed as e:
        few = (
            f"{len(keep)} of {n} prompts give a pair with a reward margin >= align.min_margin ({cfg.min_margin:g}) and "
            f"align.min_pairs is {cfg.min_pairs}: lower the margin, or raise align.samples or align.prompts; "
            if len(keep) < cfg.min_pairs
            else ""
        )
        raise ValidationFailed(f"align: {few}{e}") from None
    if bf16:  # the frozen base in bf16 (an 8B student: 16 GB, not 32); the adapters stay fp32
        pipe.transformer.to(torch.bfloat16)
    with torch.random.fork_rng(devices=[]):  # peft draws A from the global RNG: seeded here, and left as it was
        torch.manual_seed(cfg.seed)
        weights, layers = lora.add_student_adapter(pipe.transformer, spec)
    if cfg.gradient_checkpointing == "on" or (cfg.gradient_checkpointing == "auto" and device.type == "cuda"):
        pipe.transformer.enable_gradient_checkpointing(lora.checkpointing_func(layers))
    probe_seed = 7_777_777 + cfg.seed  # fresh noise: none of the candidates' seeds

    def probe():
        with lora.adapters(layers, on=True):
            return float(candidates(probe_seed, min(cfg.probe_prompts, n))[1].mean())

    curve = train_dpo(
        pipe.transformer,
        layers,
        weights,
        latents[keep, winner],
        latents[keep, loser],
        [prompts[k] for k in keep.tolist()],
        encode,
        torch.tensor(meta["student_times"]),
        time_weights,
        cfg,
        autocast,
        probe if cfg.probe_prompts else None,
        tracker,
    )
    state = {k: v.detach().cpu() for k, v in weights.state_dict().items()}
    pipe = weights = layers = latents = None  # dropped before a second copy of the student loads
    fused, adapter = lora.fused_student(student_dir, spec, state)
    trained = [r for r in curve if "loss" in r]
    probes = [r["probe_reward"] for r in curve if "probe_reward" in r]
    summary = {
        "reward": cfg.reward,
        "prompts": n,
        "candidates": int(rewards.numel()),
        "mean_candidate_reward": float(rewards.nanmean()),
        "pairs": len(keep),
        "mean_pair_margin": float((rewards[keep, winner] - rewards[keep, loser]).mean()),
        "lora": {
            "rank": spec.rank,
            "alpha": spec.alpha,
            "target_modules": list(spec.targets),
            "parameters": sum(v.numel() for v in state.values()),
        },
        "time_weights": time_weights,
        "train_steps": cfg.train_steps,
        "last_loss": trained[-1]["loss"],
        "last_implicit_accuracy": trained[-1]["implicit_accuracy"],
        **({"probe_reward_before": probes[0], "probe_reward_after": probes[-1]} if probes else {}),
        "seconds": {"sampling": sampling_s, "total": time.perf_counter() - start},
    }
    aligned = load_pipeline(student_dir, transformer=fused)
    student_meta = {k: v for k, v in meta.items() if k != "lora"}  # its LoRA (on the teacher) is not this folder's
    aligned_meta = {
        **student_meta,
        "source": "ladd-aligned",
        "aligned": {k: summary[k] for k in ("reward", "pairs", "train_steps", "lora")},
        "aligned_from": str(student_dir),
    }
    with atomic_dir(out) as tmp:
        aligned.save_pretrained(tmp, safe_serialization=True)
        lora.save_adapter(tmp, adapter, spec)
        write_meta(tmp, **aligned_meta)
        write_json(tmp / SUMMARY, {**summary, "curve": curve, "config": dataclasses.asdict(cfg)})
        plot_align_curve(
            curve, tmp / "align_curve.png", f"DPO-LoRA on the student: {len(keep)} pairs, reward {cfg.reward}"
        )
        train_summary = Path(student_dir) / "ladd_train_summary.json"
        write_model_card(tmp, aligned_meta, json.loads(train_summary.read_text()) if train_summary.is_file() else {})
    tracker.log_summary({f"align/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
    tracker.log_artifact(out / "align_curve.png")
    tracker.log_artifact(out / SUMMARY)
    log.info("align: %s", {k: summary[k] for k in ("pairs", "last_loss", "last_implicit_accuracy")})
    return summary


def model_dir(align_cfg, student_dir) -> Path:
    """The model evaluate and export use: the aligned one when the stage is on (it must have run), else the student."""
    if not align_cfg.enabled:
        return Path(student_dir)
    out = Path(align_cfg.out_dir)
    if not (out / "model_index.json").is_file():
        raise FileNotFoundError(f"{out} holds no aligned student and align.enabled is true: run `ladd align` first")
    return out
