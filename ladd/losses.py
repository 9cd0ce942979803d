"""Adversarial losses of LADD (Sauer et al. 2024, sec. 3): tensors in, tensors out.

`logits` is the list of per-head logit maps [B, h*w] of the discriminator; every head counts equally. Each
loss is an elementwise map; `per_row` averages it over positions and heads, so a loss can be weighted per
sample (the student's adversarial weight per student time) and reported per student time (GAN health).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F


class AdversarialLoss(NamedTuple):
    real: Callable  # the heads' loss on real logits, elementwise
    fake: Callable  # the heads' loss on fake logits, elementwise
    student: Callable  # the student's loss on fake logits, elementwise


ADVERSARIAL_LOSSES: dict[str, AdversarialLoss] = {
    # hinge (Lim & Ye 2017): max(0, 1 - D(real)) + max(0, 1 + D(fake)); the student minimises -D(fake)
    "hinge": AdversarialLoss(lambda r: F.relu(1 - r), lambda f: F.relu(1 + f), lambda f: -f),
    # non-saturating (Goodfellow et al. 2014): softplus(-D(real)) + softplus(D(fake)); student softplus(-D(fake))
    "nonsaturating": AdversarialLoss(lambda r: F.softplus(-r), F.softplus, lambda f: F.softplus(-f)),
}
CHANCE_LOSS = {"hinge": 2.0, "nonsaturating": 2 * math.log(2)}  # the heads' loss when logits carry no information


def per_row(fn: Callable, logits: list[torch.Tensor]) -> torch.Tensor:
    """fn's loss of each sample [B]: the mean over positions, then over heads."""
    return torch.stack([fn(x).mean(1) for x in logits]).mean(0)


def heads_loss(loss: AdversarialLoss, real: list[torch.Tensor], fake: list[torch.Tensor]) -> torch.Tensor:
    """The discriminator heads' loss, a mean over samples, positions and heads."""
    return per_row(loss.real, real).mean() + per_row(loss.fake, fake).mean()


def student_loss(loss: AdversarialLoss, fake: list[torch.Tensor], weight: torch.Tensor, batch: int) -> torch.Tensor:
    """The student's adversarial loss: sum_i weight_i loss_i / batch over the judged samples i (rows with weight 0
    are never judged), so weight 1 on every row is the plain mean."""
    return (weight * per_row(loss.student, fake)).sum() / batch


def approx_r1(real: list[torch.Tensor], real_perturbed: list[torch.Tensor]) -> torch.Tensor:
    """Approximate R1 (as in SD3-Turbo reimplementations): penalise how much the real logits move under a
    small input perturbation, a finite-difference stand-in for ||grad_x D(x)||^2 that needs no double backward."""
    return torch.stack([(a - b).pow(2).mean() for a, b in zip(real, real_perturbed)]).mean()


def _mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if key in r and math.isfinite(r[key])]
    return sum(values) / len(values) if values else math.nan


def gan_health(
    curve: list[dict],
    loss: str,
    heads: int,
    times: int = 0,
    window: float = 0.25,
    chance_gain: float = 0.05,
    win_loss: float = 0.2,
) -> dict:
    """Whether the heads discriminated over the last `window` of the logged curve: `chance` when their loss
    is within `chance_gain` of the chance level, `d_wins` when it fell below `win_loss` x chance (the student
    gets no useful gradient either way), `partial` when some judged student time has no positive real - fake
    gap, else `ok`; `off` when they judged nothing (no adversarial weight). With the figures that decided it,
    and the heads' loss and real - fake gap at each of `times` student times (NaN where never judged)."""
    rows = curve[-max(1, round(len(curve) * window)) :]
    if not rows:
        return {"status": "unknown", "summary": "no curve rows"}
    chance = CHANCE_LOSS[loss]
    loss_d = _mean(rows, "loss_d")
    if not math.isfinite(loss_d):
        return {
            "status": "off",
            "chance_loss": chance,
            "gain_over_chance": math.nan,
            "summary": "off: the heads judged no sample (adversarial weight 0 at every student time)",
        }
    gaps = [_mean(rows, f"logits_real_h{i}") - _mean(rows, f"logits_fake_h{i}") for i in range(heads)]
    gap = _mean(rows, "logits_real") - _mean(rows, "logits_fake")
    per_time = [{"loss_d": _mean(rows, f"loss_d_t{k}"), "logit_gap": _mean(rows, f"gap_t{k}")} for k in range(times)]
    gain = 1 - loss_d / chance
    no_gap = [k for k, r in enumerate(per_time) if r["logit_gap"] <= 0]  # NaN (never judged) compares False
    status = (
        "chance" if gain < chance_gain else "d_wins" if loss_d < win_loss * chance else "partial" if no_gap else "ok"
    )
    judged = [f"t{k} {r['logit_gap']:.2f}" for k, r in enumerate(per_time) if math.isfinite(r["logit_gap"])]
    summary = (
        f"{status}: heads' {loss} loss {loss_d:.3f} (chance {chance:.3f}, {100 * gain:.0f}% below), "
        f"real - fake logits {gap:.2f} (per head {', '.join(f'{g:.2f}' for g in gaps)}"
        + (f"; per student time {', '.join(judged)}" if judged else "")
        + "), "
        f"steps {int(rows[0]['step'])}-{int(rows[-1]['step'])}"
    )
    return {
        "status": status,
        "loss_d": loss_d,
        "chance_loss": chance,
        "gain_over_chance": gain,
        "logit_gap": gap,
        "logit_gap_per_head": gaps,
        "per_time": per_time,
        "summary": summary,
    }
