"""What LADD's loop is made of where public recipes differ, as small pure functions in dicts that
`distill.*` settings pick from, and the named presets that combine them.

- the student's input at a time t (`student_input`): LADD noises the teacher latent with fresh noise;
  `trajectory` uses the teacher's own state at t on the CFG path that produced the latent (and the
  record's own starting noise at t = 1), so the latent is that input's sharp ODE endpoint;
- backward simulation (`backward_share` of the t < 1 inputs; DMD2, Yin et al. 2024): the input at
  step k is made by running the current student k steps from fresh noise, as inference does;
- the discriminator's re-noising times t_hat (`renoise_times`);
- an optional regression term (`regression_weight`, `regression_target`).

Rectified flow throughout: x_t = (1 - t) x0 + t eps, x0_hat = x_t - t v.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from ladd.sampling import step


def noise_to(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps (rectified flow forward process); t per row."""
    t = t.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - t) * x0 + t * eps


def randn(shape, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Noise drawn on the CPU generator (same draws on any device), moved to `like`'s device."""
    return torch.randn(shape, generator=gen).to(like.device, like.dtype)


# --- the student's input at its time t ------------------------------------------------------------


def noised_input(x0, t, step_index, record_noise, trajectory, eps):
    """LADD: the teacher latent noised to t with fresh noise `eps` (pure noise at t = 1)."""
    return noise_to(x0, t, eps)


def trajectory_input(x0, t, step_index, record_noise, trajectory, eps):
    """The teacher's own path state at t (its starting noise at t = 1): x0 is its sharp endpoint."""
    x_t = record_noise.clone()
    lower = step_index > 0
    rows = torch.nonzero(lower).flatten()
    x_t[lower] = trajectory[rows, step_index[lower] - 1].to(x0.dtype)
    return x_t


class StudentInput(NamedTuple):
    make: Callable  # (x0, t, step_index, record_noise, trajectory, eps) -> x_t
    reads_path: bool  # needs the teacher's stored path states (synthesize.trajectory_times) and each record's noise
    fresh_noise: bool  # needs `eps`, fresh noise for its rows (drawn from the run's stream only then)


STUDENT_INPUTS: dict[str, StudentInput] = {
    "noised": StudentInput(noised_input, reads_path=False, fresh_noise=True),
    "trajectory": StudentInput(trajectory_input, reads_path=True, fresh_noise=False),
}


# --- backward simulation (DMD2) -------------------------------------------------------------------


@torch.no_grad()
def backward_simulate(
    student_velocity: Callable,
    step_index: torch.Tensor,
    times: torch.Tensor,
    c,
    p,
    like: torch.Tensor,
    stochastic: bool,
    gen: torch.Generator,
    m: torch.Tensor,
) -> torch.Tensor:
    """Inputs at times[step_index] made as inference makes them: fresh noise, then the current student's
    own steps (no gradient; `ladd.sampling.step`, re-noised between them when `stochastic`: DMD2's backward
    simulation); `m`: the rows' condition (zero channels for text-to-image)."""
    x = randn(like.shape, gen, like)
    for k in range(int(step_index.max()) if len(step_index) else 0):
        rows = step_index > k
        t, t_next = times[k], times[k + 1]
        v = student_velocity(x[rows], t.expand(int(rows.sum())), c[rows], p[rows], m[rows])
        noise = randn(v.shape, gen, v) if stochastic else None
        x[rows] = step(x[rows].float(), v, t, t_next, noise).to(x.dtype)
    return x


# --- the discriminator's re-noising times t_hat -----------------------------------------------------


def logit_normal(n: int, mean: float, std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.sigmoid(mean + std * torch.randn(n, generator=gen))


def logit_normal_times(t, mean, std, gen):
    """LADD: t_hat ~ LogitNormal(m, s), whatever the student's time."""
    return logit_normal(len(t), mean, std, gen).to(t.device)


def tied_times(t, mean, std, gen):
    """t_hat = t * u, u ~ LogitNormal(m, s): a sample from a step at t is judged at noise below t, where
    that step's changes are still visible (only ~2% of LogitNormal(1, 1) falls below 0.25)."""
    return t * logit_normal(len(t), mean, std, gen).to(t.device)


RENOISE_TIMES: dict[str, Callable] = {"logit_normal": logit_normal_times, "tied": tied_times}


# --- the regression term's target -------------------------------------------------------------------


def endpoint_target(x0, x_t, t, teacher_x0):
    """The teacher latent the input came from: with trajectory inputs the sharp ODE endpoint of x_t; with
    noised inputs an arbitrary pairing, whose best fit is the blurry posterior mean."""
    return x0


def teacher_target(x0, x_t, t, teacher_x0):
    """The frozen teacher's own one-step x0 prediction at (x_t, t)."""
    return teacher_x0(x_t, t)


class RegressionTarget(NamedTuple):
    target: Callable  # (x0, x_t, t, teacher_x0) -> the x0 that x0_hat regresses onto
    needs_source: bool  # exists only for inputs made from x0, never for backward-simulated ones


REGRESSION_TARGETS: dict[str, RegressionTarget] = {
    "endpoint": RegressionTarget(endpoint_target, needs_source=True),
    "teacher": RegressionTarget(teacher_target, needs_source=False),
}


def masked_mse(
    pred: torch.Tensor, target: torch.Tensor, rows: torch.Tensor, rows_per_rank: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error over the selected rows (0 when none is selected). With several ranks,
    `rows_per_rank` (the mean over ranks of their selected counts) rescales it so that the ranks' average is
    the mean over every rank's selected rows, not the mean of per-rank means."""
    if not rows.any():
        return pred.sum() * 0
    mse = (pred[rows].float() - target.float()).pow(2).mean()
    return mse if rows_per_rank is None else mse * rows.sum() / rows_per_rank
