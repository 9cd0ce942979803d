"""The preference stage after distillation (LADD's DPO-LoRA, Sauer et al. 2024 sec. 4): the math and the rewards.

Work in progress (issue #22): the reward registry, the Diffusion-DPO objective for rectified flow, candidate
sampling, best-vs-worst pairs and the LoRA training loop, with unit tests, and `benchmarks/align_probe.py`. Not
yet: the pairs' suite, the `ladd align` stage and its DVC/flow wiring, evaluation rows, README.

First probe on the embedded default (Intel Xeon AVX-512, 2 cores): 300 training prompts x 4 candidates at 4
steps, classifier reward, margin 0.1 -> 51 pairs; rank 16 on attention + feed_forward + adaln, lr 3e-4,
beta 2000, 100 steps of 16 pairs (10 s; candidates 2 s). Held-out 359 prompts x 3 seeds at 4 steps: reward
0.960 +- 0.001 -> 0.981 +- 0.004, share with p(prompted digit) > 0.5 0.963 -> 0.981. lr 1e-3 / beta 500 / 150
steps overfit the pairs (0.960 -> 0.929). FD not measured yet.

Diffusion-DPO (Wallace et al. 2024) for rectified flow: x_t = (1 - t) x0 + t eps, velocity target
u = eps - x0; per pair the policy's squared velocity error minus the frozen reference's, for the winner and
the loser; L = -log sigma(-beta (Delta_w - Delta_l)). With a LoRA policy the reference is the same module with
its adapters off (`ladd.lora`), so no second copy of the student is held.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from ladd.errors import ConfigError


def noised(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, 1, 1, 1)
    return (1 - t) * x0 + t * eps


def velocity_error(v: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Per sample mean of (v - (eps - x0))^2."""
    return (v.float() - (eps - x0)).pow(2).flatten(1).mean(1)


def dpo_loss(policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
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


def candidates(pipe, meta: dict, prompts: list[str], samples: int, steps: int, seed: int, batch_size: int = 128):
    """`samples` images per prompt from the student at `steps` steps (its own schedule and sampler), record i of
    sample j from seed `seed + j * 1_000_003 + i`: (latents [P, S, ...], images [P, S, 3, H, W] in [0, 1])."""
    from ladd.generate import generate_latents, record_noise
    from ladd.pipeline import decode_latents, encode_prompts, latent_shape, max_sequence_length
    from ladd.schedules import student_sigmas

    e, p = encode_prompts(pipe, prompts, meta.get("max_sequence_length", max_sequence_length(pipe.config._name_or_path)))
    shape = latent_shape(pipe)
    lat, img = [], []
    for j in range(samples):
        noise = record_noise([seed + j * 1_000_003 + i for i in range(len(prompts))], shape)
        x = generate_latents(pipe.transformer, e, p, noise, student_sigmas(steps, meta), 1.0,
                             sampler=meta.get("sampler", "renoise"), batch_size=batch_size, seed=seed + j)
        lat.append(x)
        img.append(decode_latents(pipe.vae, x, batch_size))
    return torch.stack(lat, 1), torch.stack(img, 1)


def preference_pairs(rewards: torch.Tensor, min_margin: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per prompt (row of `rewards` [P, S]) its best and worst sample: (prompt index, winner, loser) of the pairs
    whose reward margin is at least `min_margin`."""
    best, worst = rewards.argmax(1), rewards.argmin(1)
    margin = rewards.gather(1, best[:, None]).squeeze(1) - rewards.gather(1, worst[:, None]).squeeze(1)
    keep = torch.nonzero(margin >= min_margin).squeeze(1)
    return keep, best[keep], worst[keep]


def train_dpo(transformer, lora_cfg, suffixes, x_w, x_l, embeds, pooled, times: torch.Tensor, steps: int,
              batch_size: int, lr: float, beta: float, seed: int) -> tuple[torch.nn.Module, list, list[dict]]:
    """A LoRA on `transformer` trained with `dpo_loss` on the pairs (winner latents x_w, loser x_l, their prompt's
    embeddings), at the student's own times, winner and loser sharing t and eps (Diffusion-DPO's pairing). The
    reference is the same module with the adapters off. Returns (adapter weights, adapter layers, curve rows)."""
    from ladd import lora

    weights, layers = lora.add_student_adapter(transformer, lora_cfg, suffixes)
    opt = torch.optim.AdamW(weights.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    curve = []

    def errors(x0, eps, t, c, p):
        x_t = noised(x0, eps, t)

        def v():
            return transformer(hidden_states=x_t, encoder_hidden_states=c, pooled_projections=p, timestep=t * 1000).sample

        with lora.adapters(layers, on=True):
            policy = velocity_error(v(), x0, eps)
        with torch.no_grad():
            ref = velocity_error(v(), x0, eps)
        return policy, ref

    for step in range(steps):
        idx = torch.randint(len(x_w), (batch_size,), generator=gen)
        t = times[torch.randint(len(times), (batch_size,), generator=gen)]
        eps = torch.randn(x_w[idx].shape, generator=gen)
        (pw, rw), (pl, rl) = (errors(x[idx], eps, t, embeds[idx], pooled[idx]) for x in (x_w, x_l))
        loss, accuracy = dpo_loss(pw, pl, rw, rl, beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(weights.parameters(), 1.0)
        opt.step()
        curve.append({"step": step, "loss": float(loss.detach()), "implicit_accuracy": float(accuracy)})
    return weights, layers, curve


def align_student(cfg, prompts: list[str], labels, student_dir, classifier_dir, out_dir, tracker=None) -> dict:
    """WIP: the stage's body. Candidates from the student, rewards, pairs (one line naming the keys when too few),
    a DPO-LoRA, and `out_dir` written atomically: the fused pipeline, its adapter, the curve and a summary.
    `cfg` holds reward, reward_path, samples, steps, min_margin, min_pairs, lora_rank, lora_targets,
    train_steps, batch_size, lr, beta, seed."""
    import json
    import types

    from ladd import lora
    from ladd.io import atomic_dir, write_json
    from ladd.pipeline import encode_prompts, load_pipeline, read_meta, write_meta

    score = load_reward(cfg.reward, cfg.reward_path, classifier_dir)  # a bad reward fails before any sampling
    pipe, meta = load_pipeline(student_dir), read_meta(student_dir)
    lat, img = candidates(pipe, meta, prompts, cfg.samples, cfg.steps, cfg.seed)
    rewards = torch.stack([score(img[:, j], prompts, labels) for j in range(cfg.samples)], 1)
    keep, w, l = preference_pairs(rewards, cfg.min_margin)
    if len(keep) < cfg.min_pairs:
        raise ConfigError(f"align: {len(keep)} preference pairs have a reward margin >= align.min_margin "
                          f"({cfg.min_margin:g}), align.min_pairs is {cfg.min_pairs}: lower the margin, or raise "
                          "align.samples or the number of prompts")
    e, p = encode_prompts(pipe, [prompts[i] for i in keep.tolist()], meta["max_sequence_length"])
    lora_cfg = types.SimpleNamespace(lora_rank=cfg.lora_rank, lora_alpha=None, lora_dropout=0.0)
    suffixes = lora.target_suffixes(pipe.transformer, cfg.lora_targets)
    weights, _, curve = train_dpo(pipe.transformer, lora_cfg, suffixes, lat[keep, w], lat[keep, l], e, p,
                                  torch.tensor(meta["student_times"]), cfg.train_steps, cfg.batch_size, cfg.lr,
                                  cfg.beta, cfg.seed)
    fused, adapter = lora.fused_student(student_dir, lora_cfg, suffixes, weights.state_dict())
    summary = {"pairs": len(keep), "candidates": int(rewards.numel()), "mean_candidate_reward": float(rewards.mean()),
               "last_loss": curve[-1]["loss"], "last_implicit_accuracy": curve[-1]["implicit_accuracy"]}
    aligned = load_pipeline(student_dir, transformer=fused)
    with atomic_dir(out_dir) as tmp:
        aligned.save_pretrained(tmp, safe_serialization=True)
        lora.save_adapter(tmp, adapter, lora_cfg, suffixes)
        write_meta(tmp, **{**meta, "source": "ladd-aligned", "aligned": summary})
        write_json(tmp / "ladd_align_summary.json", {**summary, "curve": curve,
                                                      "config": json.loads(json.dumps(vars(cfg), default=list))})
    return summary
