"""Batched generation with any SD3-family transformer, deterministic per record: record i's noise comes
from its own seed, so results do not depend on batch size, shard size or where a run resumed."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ladd.sampling import STOCHASTIC, EulerPath, cfg_velocity, renoise_draws, sample


def record_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """x_1 for each record from its own seed: [len(seeds), *shape]."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def generate_latents(
    transformer,
    embeds,
    pooled,
    noise,
    sigmas,
    guidance: float = 1.0,
    null_embeds=None,
    null_pooled=None,
    sampler: str = "euler",
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = False,
    path_times=(),
    share=(0, 1),
    condition=None,
    step_noise=None,
):
    """Sample latents for every row of (embeds, pooled, noise); `null_*` is the empty prompt ([1, ...]).

    `seed` drives the re-noising noise of the `renoise` sampler (per batch, in order), unless `step_noise`
    [steps - 1, N, ...] gives each record's draws (`ladd.serving.seeded_draws`). With `path_times`
    (euler only) returns (latents, the Euler path at those times [N, len(path_times), ...]). `share=(r, w)`:
    only every w-th batch from the r-th (rank r of w), each exactly as a single process computes it."""
    if path_times and STOCHASTIC[sampler]:
        raise ValueError(f"path_times record an Euler path: sampler {sampler!r} re-noises between steps")
    param = next(transformer.parameters())
    device, dtype = param.device, param.dtype
    out, paths = [], []
    for i in tqdm(
        range(share[0] * batch_size, len(noise), share[1] * batch_size), disable=not progress, desc="generate"
    ):
        n = len(noise[i : i + batch_size])
        nulls = {}
        if guidance > 1.0:
            nulls = dict(
                null_embeds=null_embeds.expand(n, -1, -1).to(device, dtype),
                null_pooled=null_pooled.expand(n, -1).to(device, dtype),
            )
        model = cfg_velocity(
            transformer,
            embeds[i : i + n].to(device, dtype),
            pooled[i : i + n].to(device, dtype),
            guidance=guidance,
            **nulls,
            condition=None if condition is None else condition[i : i + n].to(device, dtype),
        )
        x = noise[i : i + n].to(device, dtype)
        draws = None
        if STOCHASTIC[sampler]:  # each record's own draws, else the batch's stream (per batch, in order)
            gen = torch.Generator(device).manual_seed(seed * 1_000_003 + i)
            draws = renoise_draws(x, gen, None if step_noise is None else step_noise[:, i : i + n])
        path = EulerPath(path_times) if path_times else None
        x = sample(model, x, sigmas.to(device), draws, callback=path)
        if path is not None:
            paths.append(path.stacked().float().cpu())
        out.append(x.float().cpu())
    if not out:  # a rank with no batch
        out = [noise[:0].float()]
    return (torch.cat(out), torch.cat(paths)) if path_times else torch.cat(out)
