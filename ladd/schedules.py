"""The student's few-step times, as stock diffusers computes them (numpy and scipy only, no torch).

A saved student's `FlowMatchEulerDiscreteScheduler` turns `num_inference_steps=k` into k times from 1 down
to its `sigma_min` (= the smallest training time t_min). Only its exponential and beta conversions take
that end from the config and work at k = 1 (`shift_terminal` divides 0 by 0 there), so the student trains
at the times one of them gives for n steps, and its k = 1, 2 and n step schedules visit trained times:

- exponential: t_i = t_min^(i/(n-1)) (n = 4, t_min = 0.25: 1, 0.630, 0.397, 0.25);
- beta: t_min + (1 - t_min) * Beta(0.6, 0.6).ppf(1 - i/(n-1)) (1, 0.793, 0.457, 0.25; diffusers needs
  scipy to run it), nearer the paper's evenly spaced 1, 0.75, 0.5, 0.25.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ladd.errors import ConfigError

if TYPE_CHECKING:
    import torch


def _exponential(n: int, t_min: float) -> np.ndarray:
    return np.exp(np.linspace(0.0, np.log(t_min), n))  # diffusers' _convert_to_exponential


def _beta(n: int, t_min: float) -> np.ndarray:
    import scipy.stats

    ppf = scipy.stats.beta.ppf(1 - np.linspace(0, 1, n), 0.6, 0.6)  # diffusers' _convert_to_beta
    return t_min + ppf * (1 - t_min)


STUDENT_SCHEDULES = {"exponential": _exponential, "beta": _beta}
SCHEDULER_FLAGS = {"exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas"}


def few_step_times(schedule: str, n: int, t_min: float) -> list[float]:
    """The n times (from 1 to t_min) the saved scheduler visits at n steps, in float32 as diffusers has them."""
    if n == 1:
        return [1.0]
    return [float(t) for t in STUDENT_SCHEDULES[schedule](n, t_min).astype(np.float32)]


def check_student_times(schedule: str, student_times) -> None:
    """`distill.student_times` must be `schedule`'s n times from 1 to their last value, so that the saved student's
    diffusers scheduler visits them. Checked when distill starts (and by the pipeline flow before its first stage),
    not at config load: the stages before distill never run this file."""
    ladder = few_step_times(schedule, len(student_times), student_times[-1])
    if any(abs(a - b) > 1e-6 for a, b in zip(student_times, ladder)):
        raise ConfigError(
            f"distill.student_times must be the {schedule} schedule's times from 1 to their last value, "
            f"so that the saved student's diffusers scheduler visits them: use "
            f"[{', '.join(f'{t:.10g}' for t in ladder)}], got {list(student_times)}"
        )


def student_sigmas(steps: int, student_meta: dict) -> torch.Tensor:
    """k-step schedule of a saved student, as its diffusers scheduler gives it: its schedule's times from 1
    to its smallest training time, then 0."""
    import torch  # here: config loading imports this module and stays free of torch

    times = student_meta.get("student_times", [1.0])
    return torch.tensor(
        [*few_step_times(student_meta.get("schedule", "exponential"), steps, min(times)), 0.0], dtype=torch.float32
    )


def trained_step_counts(student_meta: dict) -> list[int]:
    """The step counts k <= n whose k-step schedule visits only times the student trained at (1, 2 and n for n
    training times): the counts a served student accepts. A folder ladd did not make: 1 to its default steps."""
    if "student_times" not in student_meta:
        return list(range(1, int(student_meta.get("default_steps", 4)) + 1))
    times = student_meta["student_times"]
    schedule = student_meta.get("schedule", "exponential")
    return [
        k
        for k in range(1, len(times) + 1)
        if all(any(abs(t - s) < 1e-4 for s in times) for t in few_step_times(schedule, k, min(times)))
    ]
