"""Adversarial losses of LADD (Sauer et al. 2024, sec. 3): tensors in, scalar tensors out.

`logits` is the list of per-head logit maps [B, h*w] of the discriminator; every head counts equally.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _mean_over_heads(per_head) -> torch.Tensor:
    return torch.stack([x.mean() for x in per_head]).mean()


def hinge_d(real: list[torch.Tensor], fake: list[torch.Tensor]) -> torch.Tensor:
    """Hinge loss for the heads (Lim & Ye 2017): E[max(0, 1 - D(real))] + E[max(0, 1 + D(fake))]."""
    return _mean_over_heads([F.relu(1 - r) for r in real]) + _mean_over_heads([F.relu(1 + f) for f in fake])


def hinge_g(fake: list[torch.Tensor]) -> torch.Tensor:
    """Generator side of the hinge loss: -E[D(fake)]."""
    return -_mean_over_heads(fake)


def nonsaturating_d(real: list[torch.Tensor], fake: list[torch.Tensor]) -> torch.Tensor:
    """Non-saturating GAN loss for the heads (Goodfellow et al. 2014): softplus(-D(real)) + softplus(D(fake))."""
    return _mean_over_heads([F.softplus(-r) for r in real]) + _mean_over_heads([F.softplus(f) for f in fake])


def nonsaturating_g(fake: list[torch.Tensor]) -> torch.Tensor:
    return _mean_over_heads([F.softplus(-f) for f in fake])


ADVERSARIAL_LOSSES = {"hinge": (hinge_d, hinge_g), "nonsaturating": (nonsaturating_d, nonsaturating_g)}


def approx_r1(real: list[torch.Tensor], real_perturbed: list[torch.Tensor]) -> torch.Tensor:
    """Approximate R1 (as in SD3-Turbo reimplementations): penalise how much the real logits move under a
    small input perturbation, a finite-difference stand-in for ||grad_x D(x)||^2 that needs no double backward."""
    return _mean_over_heads([(a - b).pow(2) for a, b in zip(real, real_perturbed)])


def mean_logits(logits: list[torch.Tensor]) -> torch.Tensor:
    return _mean_over_heads(logits)


CHANCE_LOSS = {"hinge": 2.0, "nonsaturating": 2 * math.log(2)}  # the heads' loss when logits carry no information


def gan_health(curve: list[dict], loss: str, heads: int, window: float = 0.25, chance_gain: float = 0.05,
               win_loss: float = 0.2) -> dict:
    """Whether the heads discriminated over the last `window` of the logged curve: `chance` when their loss
    is within `chance_gain` of the chance level, `d_wins` when it fell below `win_loss` x chance (the student
    gets no useful gradient either way), else `ok`; with the figures that decided it."""
    rows = curve[-max(1, round(len(curve) * window)):]
    if not rows:
        return {"status": "unknown", "summary": "no curve rows"}
    chance = CHANCE_LOSS[loss]
    loss_d = sum(r["loss_d"] for r in rows) / len(rows)
    gaps = [sum(r[f"logits_real_h{i}"] - r[f"logits_fake_h{i}"] for r in rows) / len(rows) for i in range(heads)]
    gap = sum(r["logits_real"] - r["logits_fake"] for r in rows) / len(rows)
    gain = 1 - loss_d / chance
    status = "chance" if gain < chance_gain else "d_wins" if loss_d < win_loss * chance else "ok"
    summary = (f"{status}: heads' {loss} loss {loss_d:.3f} (chance {chance:.3f}, {100 * gain:.0f}% below), "
               f"real - fake logits {gap:.2f} (per head {', '.join(f'{g:.2f}' for g in gaps)}), "
               f"steps {int(rows[0]['step'])}-{int(rows[-1]['step'])}")
    return {"status": status, "loss_d": loss_d, "chance_loss": chance, "gain_over_chance": gain, "logit_gap": gap,
            "logit_gap_per_head": gaps, "summary": summary}
