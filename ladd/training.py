"""Training helpers that the teacher's pretraining and distillation share."""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW as one fused kernel over all parameters (on the CPU ~3x faster than the per-tensor loop, which
    at the embedded default's 122 small tensors is 7% of a training step); FSDP's DTensor shards keep the
    default implementation."""
    params = list(params)
    return torch.optim.AdamW(params, fused=not any(isinstance(p, DTensor) for p in params), **kwargs)


def warmup_cosine(step: int, total: int, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 10%: the factor on the base learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.device), 1 - decay)  # the EMA may live on the CPU
