"""LADD's discriminator: the frozen teacher is the feature network; small trainable heads read the
image tokens after chosen transformer blocks (Sauer et al. 2024, sec. 3.1).

The teacher's weights never get gradients, but its forward pass is differentiable w.r.t. its input,
so the student's adversarial gradient flows through the teacher into x0_hat.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
from diffusers.models.embeddings import get_timestep_embedding

from ladd.errors import ConfigError


def check_latent_size(config, size) -> tuple[int, int]:
    """The token grid (H/p, W/p) of latents of `size` (H, W); ValueError when the transformer cannot take them."""
    p, limit = config.patch_size, config.pos_embed_max_size
    h, w = (int(s) for s in size)
    if h % p or w % p:
        raise ValueError(f"latent size {h}x{w} is not divisible by the transformer's patch size {p}")
    if limit is not None and max(h, w) // p > limit:
        raise ValueError(
            f"latent size {h}x{w} is {h // p}x{w // p} patches; the transformer's pos_embed_max_size is {limit}"
        )
    return h // p, w // p


def default_feature_layers(num_layers: int, count: int = 4) -> list[int]:
    """`count` blocks spread evenly over the depth, always including the last."""
    count = min(count, num_layers)
    return sorted({round((i + 1) * num_layers / count) - 1 for i in range(count)})


def resolve_feature_layers(setting, num_layers: int) -> list[int]:
    """The blocks that get a head: `setting`, where a negative index counts from the top as in Python ([-2, -1]:
    the two deepest blocks of any teacher); None: `default_feature_layers`."""
    if setting is None:
        return default_feature_layers(num_layers)
    if not setting or any(not -num_layers <= i < num_layers for i in setting):
        raise ConfigError(
            f"distill.feature_layers: {list(setting)} must name blocks of the teacher's {num_layers} "
            f"(0 to {num_layers - 1}, or -{num_layers} to -1 from the top)"
        )
    return [i % num_layers for i in setting]


class DiscriminatorHead(nn.Module):
    """2D conv head on one block's token map, conditioned on the noise level t_hat and the pooled text
    embedding through a projection term (Miyato & Koyama 2018): logit = out(h) + <h, proj(c)>."""

    def __init__(self, in_dim: int, cond_dim: int, channels: int = 64):
        super().__init__()
        groups = math.gcd(32, channels)
        self.body = nn.Sequential(
            nn.Conv2d(in_dim, channels, 1),
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
        )
        self.cond = nn.Linear(cond_dim, channels)
        self.out = nn.Conv2d(channels, 1, 1)
        self.scale = channels**-0.5

    def forward(self, features: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.body(features)
        logits = self.out(h) + self.scale * (h * self.cond(cond)[:, :, None, None]).sum(1, keepdim=True)
        return logits.flatten(1)


class Discriminator(nn.Module):
    """Heads on top of a frozen teacher transformer. Only the heads are parameters of this module (the
    teacher is held outside the module tree so it is never optimised or saved with the heads)."""

    def __init__(self, teacher, layers: list[int], channels: int = 64, t_embed_dim: int = 64, truncate: bool = True):
        super().__init__()
        cfg = teacher.config
        self._teacher = [teacher]
        self.layers = sorted(set(layers))  # hooks fire in block order; heads follow the same order
        if not self.layers or max(self.layers) >= cfg.num_layers or min(self.layers) < 0:
            raise ValueError(f"feature layers {self.layers} must lie in [0, {cfg.num_layers - 1}]")
        self.t_embed_dim = t_embed_dim
        # blocks above the deepest hooked one cannot change the features: skip them (diffusers' skip_layers)
        self.skip = list(range(max(self.layers) + 1, cfg.num_layers)) if truncate else None
        inner = cfg.num_attention_heads * cfg.attention_head_dim
        cond_dim = t_embed_dim + cfg.pooled_projection_dim
        self.heads = nn.ModuleList(DiscriminatorHead(inner, cond_dim, channels) for _ in self.layers)

    @property
    def teacher(self):
        return self._teacher[0]

    @contextlib.contextmanager
    def _hooks(self, store: dict, grid: tuple[int, int]):
        def grab(index):
            def hook(_module, _inputs, output):
                tokens = output[1]  # JointTransformerBlock returns (text tokens, image tokens), row-major over grid
                # keyed by block: gradient checkpointing recomputes blocks (and fires hooks) again in backward
                store[index] = tokens.transpose(1, 2).unflatten(2, grid)

            return hook

        handles = [self.teacher.transformer_blocks[i].register_forward_hook(grab(i)) for i in self.layers]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def features(
        self,
        x: torch.Tensor,
        t_hat: torch.Tensor,
        embeds: torch.Tensor,
        pooled: torch.Tensor,
        condition: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Image-token maps [B, D, H/p, W/p] after each chosen block of the teacher at noise level t_hat, for
        latents x of any size the teacher accepts; an inpainting teacher reads x beside its `condition` (mask and
        masked-image latent), so the heads judge the sample given what it had to fill."""
        if condition is not None:
            x = torch.cat([x, condition.to(x.dtype)], 1)
        grid = check_latent_size(self.teacher.config, x.shape[-2:])
        store: dict[int, torch.Tensor] = {}
        dtype = self.teacher.dtype  # a bf16 teacher takes bf16 inputs; the gradient flows back through the cast
        with self._hooks(store, grid):
            self.teacher(
                hidden_states=x.to(dtype),
                encoder_hidden_states=embeds.to(dtype),
                pooled_projections=pooled.to(dtype),
                timestep=t_hat * 1000,
                skip_layers=self.skip,
            )
        return [store[i] for i in self.layers]

    def heads_logits(
        self, features: list[torch.Tensor], t_hat: torch.Tensor, pooled: torch.Tensor
    ) -> list[torch.Tensor]:
        t_emb = get_timestep_embedding(t_hat * 1000, self.t_embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        cond = torch.cat([t_emb.to(pooled.dtype), pooled], dim=1)
        return [head(f.to(cond.dtype), cond) for head, f in zip(self.heads, features)]

    def forward(self, x, t_hat, embeds, pooled, condition=None) -> list[torch.Tensor]:
        return self.heads_logits(self.features(x, t_hat, embeds, pooled, condition), t_hat, pooled)
