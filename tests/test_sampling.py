"""Our pure sampler against diffusers' own StableDiffusion3Pipeline and scheduler."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ladd.pipeline import encode_prompts, latent_shape, load_pipeline, max_sequence_length
from ladd.sampling import cfg_velocity, flow_sigmas, initial_noise, sample_euler, sample_renoise, step, time_shift
from ladd.schedules import few_step_times


@pytest.mark.parametrize("steps", [1, 2, 4, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_sigmas_match_scheduler(steps, shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    torch.testing.assert_close(flow_sigmas(steps, shift), sched.sigmas, rtol=0, atol=1e-6)


def test_time_shift_fixed_points():
    t = torch.tensor([0.0, 0.5, 1.0])
    assert time_shift(t, 3.0).tolist() == [0.0, 0.75, 1.0]


def _ours(pipe, prompts, steps, guidance, seed, msl, sampler="euler", sigmas=None):
    embeds, pooled = encode_prompts(pipe, prompts, msl)
    null_e, null_p = encode_prompts(pipe, [""] * len(prompts), msl)
    x = initial_noise(len(prompts), latent_shape(pipe), torch.Generator().manual_seed(seed))
    model = cfg_velocity(pipe.transformer, embeds, pooled, null_e, null_p, guidance)
    sigmas = flow_sigmas(steps, pipe.scheduler.config.shift) if sigmas is None else sigmas
    if sampler == "euler":
        return sample_euler(model, x, sigmas)
    return sample_renoise(model, x, sigmas)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_euler_cfg_matches_diffusers_pipeline(tiny_teacher_dir, guidance):
    pipe = load_pipeline(tiny_teacher_dir)
    msl = max_sequence_length(tiny_teacher_dir)
    prompts = ["a handwritten digit seven", "the number 3 written by hand"]
    ref = pipe(
        prompts,
        num_inference_steps=6,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(11),
        output_type="latent",
        max_sequence_length=msl,
    ).images
    ours = _ours(pipe, prompts, 6, guidance, 11, msl)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_renoise_matches_stochastic_scheduler(tiny_teacher_dir):
    """diffusers draws the re-noising noise from the global RNG; seed it identically for both."""
    pipe = load_pipeline(tiny_teacher_dir)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_exponential_sigmas=True, stochastic_sampling=True)
    pipe.scheduler.register_to_config(sigma_min=0.25, sigma_max=1.0)  # as a saved student's
    msl = max_sequence_length(tiny_teacher_dir)
    torch.manual_seed(5)
    ref = pipe(
        ["handwritten four"],
        num_inference_steps=4,
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(2),
        output_type="latent",
        max_sequence_length=msl,
    ).images
    torch.manual_seed(5)
    ours = _ours(
        pipe,
        ["handwritten four"],
        4,
        0.0,
        2,
        msl,
        "renoise",
        torch.tensor([*few_step_times("exponential", 4, 0.25), 0.0]),
    )
    assert (ours - ref).abs().max().item() <= 1e-5


def test_one_step_for_every_sampler():
    """Euler is the re-noise step whose noise is the step's own eps estimate x + (1 - t) v; both end on x0 at t = 0,
    on tensors and on the floats the exported graph bakes in."""
    x, v = torch.randn(3, 4, 2, 2, dtype=torch.float64), torch.randn(3, 4, 2, 2, dtype=torch.float64)
    for t, t_next in ((1.0, 0.6), (torch.tensor(0.6), torch.tensor(0.25))):
        eps_hat = x + (1 - t) * v
        torch.testing.assert_close(step(x, v, t, t_next), step(x, v, t, t_next, eps_hat))
        torch.testing.assert_close(step(x, v, t, 0.0), x - t * v, rtol=0, atol=0)
        torch.testing.assert_close(step(x, v, t, 0.0, torch.randn_like(x)), x - t * v, rtol=0, atol=0)
    noise = torch.randn_like(x)  # re-noise: x0 = x - t v, then (1 - t_next) x0 + t_next noise
    torch.testing.assert_close(step(x, v, 0.75, 0.5, noise), 0.5 * (x - 0.75 * v) + 0.5 * noise)
