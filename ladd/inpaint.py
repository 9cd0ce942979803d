"""Inpainting: the masks, the condition channels, and the widening of a text-to-image MMDiT into
the 33-channel layout `StableDiffusion3InpaintPipeline` runs.

Layout (diffusers' SD3 inpaint pipeline): the transformer's input is [noisy latent (C), mask (1), masked-image
latent (C)] on channels, C = the VAE's latent channels; diffusers accepts in_channels 16 (then it blends the
known region back at each step, SDEdit-style) or 33 (a trained inpainting model, C = 16). The mask is 1 where
the image is to be generated, 0 where it is kept; at latent resolution it is the pixel mask resized (nearest).
Every stage draws its masks from `record_masks`: one seeded stream per stage, one mask per record id.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_masks(seeds: list[int], height: int, width: int) -> torch.Tensor:
    """One mask per seed, [N, 1, H, W] float in {0, 1} (1: to inpaint): half boxes, half brush strokes, each
    covering between ~10% and ~60% of the image; record i's mask depends only on its seed."""
    out = []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        mask = torch.zeros(height, width)
        if torch.rand((), generator=g) < 0.5:  # a box
            h = int(height * (0.3 + 0.5 * torch.rand((), generator=g)))
            w = int(width * (0.3 + 0.5 * torch.rand((), generator=g)))
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            mask[top : top + h, left : left + w] = 1
        else:  # strokes: a random walk of discs
            radius = max(1.0, min(height, width) * (0.06 + 0.06 * float(torch.rand((), generator=g))))
            y, x = float(torch.rand((), generator=g)) * height, float(torch.rand((), generator=g)) * width
            yy, xx = torch.meshgrid(
                torch.arange(height, dtype=torch.float), torch.arange(width, dtype=torch.float), indexing="ij"
            )
            for _ in range(int(torch.randint(4, 12, (), generator=g))):
                angle = float(torch.rand((), generator=g)) * 2 * math.pi
                step = min(height, width) * (0.1 + 0.2 * float(torch.rand((), generator=g)))
                for k in range(8):  # discs along the segment
                    cy, cx = y + math.sin(angle) * step * k / 7, x + math.cos(angle) * step * k / 7
                    mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = 1
                y = min(max(y + math.sin(angle) * step, 0.0), height - 1.0)
                x = min(max(x + math.cos(angle) * step, 0.0), width - 1.0)
        out.append(mask)
    return torch.stack(out)[:, None]


MASK_STREAMS = {"teacher": 0, "synthesize": 1, "evaluate": 2}  # disjoint seeds: no stage reuses another's masks


def record_masks(stream: str, ids, mask_seed: int, height: int, width: int) -> torch.Tensor:
    """`random_masks` of records `ids` (non-negative ints below 2**32) in one stage's stream of `inpaint.mask_seed`."""
    return random_masks([(mask_seed << 36) + (MASK_STREAMS[stream] << 32) + int(i) for i in ids], height, width)


def has_condition(in_channels: int, latent_channels: int) -> bool:
    """Whether an SD3 transformer is an inpainting one: it takes the latent, mask and masked-image latent."""
    return in_channels == 2 * latent_channels + 1


def check_task(pipe_dir, enabled: bool) -> None:
    """ConfigError unless the pipeline folder's transformer matches `inpaint.enabled` (read from its configs)."""
    from ladd.errors import ConfigError
    from ladd.pipeline import component_config

    in_channels = component_config(pipe_dir, "transformer")["in_channels"]
    if has_condition(in_channels, component_config(pipe_dir, "vae")["latent_channels"]) != enabled:
        kind = "an inpainting" if not enabled else "a text-to-image"
        raise ConfigError(
            f"inpaint.enabled is {str(enabled).lower()} but {pipe_dir} holds {kind} transformer "
            f"({in_channels} input channels): rerun the teacher stage (and those after it) "
            "with this inpaint.enabled"
        )


def check_mask(mask: torch.Tensor, image_hw: tuple[int, int], name: str) -> None:
    """A mask the pipeline can use: the image's size, and neither empty nor everything (ValueError naming it)."""
    if tuple(mask.shape[-2:]) != tuple(image_hw):
        raise ValueError(f"{name}: mask is {tuple(mask.shape[-2:])}, the image {tuple(image_hw)}: they must match")
    covered = float((mask > 0.5).float().mean())
    if covered == 0.0 or covered == 1.0:
        raise ValueError(
            f"{name}: mask is all {'zeros' if covered == 0 else 'ones'}: nothing to "
            f"{'inpaint' if covered == 0 else 'keep'}"
        )


def latent_mask(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """The pixel mask at latent resolution, as diffusers' `prepare_mask_latents` resizes it (nearest)."""
    return F.interpolate(mask.float(), size=tuple(latent_hw))


def masked_images(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] with the region to inpaint set to 0 (diffusers: `init_image * (mask < 0.5)`)."""
    return images * (mask < 0.5)


def condition(mask_latent: torch.Tensor, masked_latent: torch.Tensor) -> torch.Tensor:
    """The channels after the noisy latent: [mask (1), masked-image latent (C)]."""
    return torch.cat([mask_latent, masked_latent], dim=1)


def widen_transformer(transformer):
    """A copy of a text-to-image SD3 transformer taking [latent, mask, masked-image latent] (2C + 1 channels),
    out_channels C. The new channels' patch-embedding weights are zero, so it computes what the base computes
    whatever the condition: fine-tuning then teaches it to use them."""
    from diffusers import SD3Transformer2DModel

    base = transformer.config
    c = base.in_channels
    out_channels = base.out_channels or c
    if c != out_channels:
        raise ValueError(f"transformer in_channels {c} != out_channels {out_channels}: already an inpainting model?")
    config = {**dict(base), "in_channels": 2 * c + 1, "out_channels": out_channels}
    wide = SD3Transformer2DModel.from_config(config).to(dtype=next(transformer.parameters()).dtype)
    state = transformer.state_dict()
    conv = state["pos_embed.proj.weight"]  # [inner, C, p, p]
    state["pos_embed.proj.weight"] = torch.cat(
        [conv, torch.zeros(conv.shape[0], c + 1, *conv.shape[2:], dtype=conv.dtype)], 1
    )
    wide.load_state_dict(state)
    return wide


def condition_of(vae, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] [N, C, H, W] and their pixel masks -> the condition channels [N, 1 + C_latent, h, w]: the mask
    at latent resolution and the masked image's latent (posterior mean, SD3's shift and scale), as diffusers' pipeline
    makes them (the hole is 0 in [-1, 1]). Traceable: the ONNX export's `inpaint_condition` graph is this."""
    from ladd.pipeline import vae_scaling

    scale, shift = vae_scaling(vae)
    z = (vae.encode(masked_images(images * 2 - 1, masks)).latent_dist.mean - shift) * scale
    return condition(latent_mask(masks, z.shape[-2:]).to(z.dtype), z)


@torch.no_grad()
def inpaint_condition(vae, images: torch.Tensor, masks: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """`condition_of` uint8 images, in batches on the VAE's device; float32 on the CPU."""
    param = next(vae.parameters())
    return torch.cat(
        [
            condition_of(
                vae,
                (images[i : i + batch_size].float() / 255).to(param.device, param.dtype),
                masks[i : i + batch_size].to(param.device, param.dtype),
            )
            .float()
            .cpu()
            for i in range(0, len(images), batch_size)
        ]
    )
