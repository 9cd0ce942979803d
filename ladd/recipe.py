"""A distillation run's recipe: the variants its `distill.*` settings pick from `ladd.variants`' dicts (the student's
input, the discriminator's re-noising times t_hat, the regression target), the sampler between simulated steps, the
adversarial loss, and lambda_adv per student time, with their settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ladd.config import DistillConfig
from ladd.losses import ADVERSARIAL_LOSSES, AdversarialLoss
from ladd.sampling import STOCHASTIC
from ladd.variants import REGRESSION_TARGETS, RENOISE_TIMES, STUDENT_INPUTS, RegressionTarget, StudentInput, masked_mse

if TYPE_CHECKING:
    from ladd.distributed import World
    from ladd.networks import Networks


@dataclass(frozen=True)
class Recipe:
    """The variants `cfg` names (`ladd.variants`' dicts), with their settings: how the student's inputs are made,
    the discriminator's re-noising times t_hat, the regression target, the sampler between simulated steps, the
    adversarial loss and lambda_adv per student time."""

    student_input: StudentInput
    renoise_time: Callable
    renoise_mean: float
    renoise_std: float
    regression: RegressionTarget
    regression_weight: float
    regression_weight_one: float
    stochastic: bool
    adversarial: AdversarialLoss
    adversarial_weights: torch.Tensor  # the heads judge (and the teacher runs for) only rows with a weight above 0

    @classmethod
    def of(cls, cfg: DistillConfig, n_times: int, device: torch.device) -> Recipe:
        weights = cfg.adversarial_weight * torch.tensor(cfg.adversarial_time_weights or [1.0] * n_times)
        return cls(
            STUDENT_INPUTS[cfg.student_input],
            RENOISE_TIMES[cfg.renoise_times],
            cfg.renoise_mean,
            cfg.renoise_std,
            REGRESSION_TARGETS[cfg.regression_target],
            cfg.regression_weight,
            cfg.regression_weight_one,
            STOCHASTIC[cfg.sampler],
            ADVERSARIAL_LOSSES[cfg.loss],
            weights.to(device),
        )

    def t_hat(self, t_all: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The re-noising times of the global batch (drawn whole on every rank, so the stream stays shared)."""
        return self.renoise_time(t_all, self.renoise_mean, self.renoise_std, gen)

    def regression_loss(self, nets: Networks, world: World, x0_hat, x0, x_t, t, c, p, m, simulated):
        """Optional MSE of x0_hat to the regression target, weighted separately below t = 1 and at t = 1. An
        endpoint exists only for inputs made from x0 (never for simulated ones; at t = 1 only on a trajectory).
        Each MSE is over the selected rows of the global batch, whichever rank holds them."""
        has_target = ~simulated if self.regression.needs_source else torch.ones_like(simulated)
        loss = x0_hat.sum() * 0
        for weight, rows in ((self.regression_weight, t < 1), (self.regression_weight_one, t == 1)):
            rows = rows & has_target
            per_rank = world.mean(rows.sum().float()) if world.size > 1 else None  # on every rank, rows or not
            if weight > 0 and rows.any():
                target = self.regression.target(
                    x0[rows],
                    x_t[rows],
                    t[rows],
                    lambda x, tt, rows=rows: nets.teacher_x0(x, tt, c[rows], p[rows], m[rows]),
                )
                loss = loss + weight * masked_mse(x0_hat, target, rows, per_rank)
        return loss
