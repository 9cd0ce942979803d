"""Rectified-flow sampling as pure functions (k-diffusion style: `model(x, t) -> v`).

Convention (SD3, Esser et al. 2024): x_t = (1 - t) x0 + t eps, the network predicts v = eps - x0,
t in [0, 1] with t = 1 pure noise. The transformer itself takes `timestep = 1000 t`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import trange

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NUM_TRAIN_TIMESTEPS = 1000


def time_shift(t, shift: float):
    """SD3's resolution shift t' = s t / (1 + (s - 1) t) (Esser et al. 2024, eq. 23)."""
    return shift * t / (1 + (shift - 1) * t)


def flow_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """The `steps + 1` times of diffusers' FlowMatchEulerDiscreteScheduler (static shift), ending at 0:
    evenly spaced from 1 to the scheduler's smallest time, then shifted. (A saved student's few-step times
    come from `ladd.schedules`.)"""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t_min = float(np.float32(time_shift(np.float32(1.0 / NUM_TRAIN_TIMESTEPS), shift)))
    t = np.linspace(NUM_TRAIN_TIMESTEPS, t_min * NUM_TRAIN_TIMESTEPS, steps) / NUM_TRAIN_TIMESTEPS
    t = time_shift(t, shift)
    return torch.cat([torch.from_numpy(t).to(torch.float32), torch.zeros(1)])


def cfg_velocity(
    transformer,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    null_embeds: torch.Tensor | None = None,
    null_pooled: torch.Tensor | None = None,
    guidance: float = 1.0,
    condition: torch.Tensor | None = None,
) -> Velocity:
    """v(x, t) of an SD3 transformer with classifier-free guidance (Ho & Salimans 2022).

    Guidance applies when `guidance > 1`, as in diffusers: v = v_null + g (v_cond - v_null). `condition`
    (inpainting: mask and masked-image latent) is concatenated to x on channels, in both CFG halves as diffusers does.
    """
    use_cfg = guidance > 1.0
    if use_cfg:
        embeds, pooled_all = torch.cat([null_embeds, prompt_embeds]), torch.cat([null_pooled, pooled])
    else:
        embeds, pooled_all = prompt_embeds, pooled

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if condition is not None:
            x = torch.cat([x, condition.to(x.dtype)], 1)
        x_in = torch.cat([x, x]) if use_cfg else x
        timestep = (t * NUM_TRAIN_TIMESTEPS).expand(x_in.shape[0])
        v = transformer(
            hidden_states=x_in,
            encoder_hidden_states=embeds,
            pooled_projections=pooled_all,
            timestep=timestep,
            return_dict=False,
        )[0]
        if not use_cfg:
            return v
        v_null, v_cond = v.chunk(2)
        return v_null + guidance * (v_cond - v_null)

    return velocity


def step(x, v, t, t_next, noise=None):
    """One sampler step x_t -> x_{t_next}, given v = eps - x0 predicted at (x, t): the one update every sampler
    of ladd runs (`sample`, distill's backward simulation, the exported ONNX graph; `ladd.onnx_runtime` keeps a
    numpy copy).

    noise None: Euler on the flow ODE, x + (t_next - t) v (diffusers' FlowMatchEulerDiscreteScheduler);
    noise given: ADD/LADD's re-noise step, x0 = x - t v, then (1 - t_next) x0 + t_next noise (the same scheduler
    with stochastic_sampling=True). Both end on x0 = x - t v at t_next = 0 (Euler's x + (0 - t) v is the same
    float), which needs no draw. Tensors or floats for t and t_next; the arithmetic is in x's dtype. `noise` may be
    a function giving the draw, called only where it is used: the exported graph reads its step_noise input there,
    after x0, so the graph's nodes stay in the order the ops run."""
    if float(t_next) == 0:
        return x - t * v
    if noise is None:
        return x + (t_next - t) * v
    x0 = x - t * v
    return (1 - t_next) * x0 + t_next * (noise() if callable(noise) else noise)


Draws = Callable[[int], torch.Tensor]  # step index -> the re-noising draw of that step


def renoise_draws(like: torch.Tensor, generator: torch.Generator | None = None, step_noise=None) -> Draws:
    """The re-noise sampler's draws: `step_noise[i]` ([len(sigmas) - 2, *x.shape]: the last step, to t = 0,
    needs none), else fresh noise from `generator` on x's device, one per step in order."""
    if step_noise is not None:
        return lambda i: step_noise[i].to(like.device, like.dtype) if i < len(step_noise) else torch.zeros_like(like)
    return lambda i: torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


@torch.no_grad()
def sample(
    model: Velocity,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    draws: Draws | None = None,
    callback: Callable | None = None,
    disable: bool = True,
) -> torch.Tensor:
    """`step` from sigmas[0] to sigmas[-1]: Euler without `draws`, the re-noise sampler with them. The state is
    carried in x's dtype and each step computed in float32. `callback(x, v, t, t_next)` sees each step
    (k-diffusion style), e.g. to record the path."""
    for i in trange(len(sigmas) - 1, disable=disable, desc="sample"):
        t, t_next = sigmas[i], sigmas[i + 1]
        v = model(x, t)
        if callback is not None:
            callback(x, v, t, t_next)
        x = step(x.to(torch.float32), v, t, t_next, None if draws is None else draws(i)).to(x.dtype)
    return x


def sample_euler(model: Velocity, x: torch.Tensor, sigmas: torch.Tensor, disable: bool = True, callback=None):
    """Euler integration of the flow ODE dx/dt = v from sigmas[0] to sigmas[-1] (the teacher's sampler)."""
    return sample(model, x, sigmas, callback=callback, disable=disable)


def sample_renoise(
    model: Velocity, x: torch.Tensor, sigmas: torch.Tensor, generator=None, disable=True, step_noise=None
):
    """Few-step sampling of ADD/LADD students: x0 = x_t - t v, then re-noise to the next t with fresh noise: the
    distribution the student trains on at t < 1 (clean latent + independent noise). `step_noise` gives the draws
    instead of `generator` (`renoise_draws`)."""
    return sample(model, x, sigmas, renoise_draws(x, generator, step_noise), disable=disable)


class EulerPath:
    """Records an Euler solve at given times: the Euler path is piecewise linear in t, so the state at a
    time tau in [t_next, t) is exactly x + (tau - t) v of the step that spans it. Pass as `callback`."""

    def __init__(self, times):
        self.times = [float(t) for t in times]
        self.states: dict[int, torch.Tensor] = {}

    def __call__(self, x, v, t, t_next):
        for k, tau in enumerate(self.times):
            if float(t_next) <= tau < float(t) or (tau == float(t) == 1.0):
                self.states[k] = (x.to(torch.float32) + (tau - float(t)) * v.float()).to(x.dtype)

    def stacked(self) -> torch.Tensor:
        """[N, len(times), ...] in the order of `times`."""
        missing = [self.times[k] for k in range(len(self.times)) if k not in self.states]
        if missing:
            raise ValueError(f"the schedule never reached times {missing}")
        return torch.stack([self.states[k] for k in range(len(self.times))], dim=1)


# the samplers by name (distill.sampler, an export's manifest): whether they draw fresh noise between steps
STOCHASTIC = {"euler": False, "renoise": True}


def initial_noise(n: int, shape: tuple[int, ...], generator: torch.Generator, device="cpu", dtype=torch.float32):
    """x_1 ~ N(0, I), drawn like diffusers' prepare_latents so a shared generator gives the same noise."""
    return torch.randn((n, *shape), generator=generator, device=device, dtype=dtype)
