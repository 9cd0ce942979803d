"""Adversarial losses of LADD (Sauer et al. 2024, sec. 3): tensors in, scalar tensors out.

`logits` is the list of per-head logit maps [B, h*w] of the discriminator; every head counts equally.
"""

from __future__ import annotations

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
