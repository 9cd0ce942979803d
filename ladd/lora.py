"""LoRA students (`distill.student: lora`): peft adapters on the teacher's own transformer, through diffusers'
SD3 LoRA support. One copy of the base weights serves both networks LADD needs: adapters on, it is the
student; off (the resting state), it is the frozen teacher whose features the heads judge and whose
predictions the regression terms read. Saved as stock diffusers loads it (`load_lora_weights`) and fused
into a complete transformer, so every later stage sees a plain student."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ladd.errors import ConfigError
from ladd.io import canonicalize_safetensors

# Module-name suffixes of SD3 / SD3.5 MMDiT blocks, by group (an entry of distill.lora_targets is a group or a
# suffix of its own). "attention" is what diffusers' SD3 LoRA scripts train; attn2 exists in SD3.5-medium.
LORA_TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": (
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn2.to_q",
        "attn2.to_k",
        "attn2.to_v",
        "attn2.to_out.0",
    ),
    "feed_forward": ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
    "adaln": ("norm1.linear", "norm1_context.linear"),
}
ADAPTER = "default"  # peft's adapter name: the one diffusers' load_lora_weights also gives a single LoRA


def target_suffixes(transformer: torch.nn.Module, targets, key: str = "distill.lora_targets") -> list[str]:
    """The module-name suffixes (peft's `target_modules`) that `targets` names and that exist in `transformer`
    (a meta-device one will do); a ConfigError names an entry that selects no linear layer."""
    linear = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    chosen = []
    for entry in targets:
        hits = [
            s for s in LORA_TARGET_GROUPS.get(entry, (entry,)) if any(n == s or n.endswith("." + s) for n in linear)
        ]
        if not hits:
            raise ConfigError(
                f"{key}: {entry!r} matches no linear layer of the teacher's transformer "
                f"(a group of {sorted(LORA_TARGET_GROUPS)}, or a module-name suffix such as attn.to_q)"
            )
        chosen += [s for s in hits if s not in chosen]
    return chosen


def check_targets(teacher_dir, targets, key: str = "distill.lora_targets") -> list[str]:
    """`target_suffixes` on the teacher's transformer built on the meta device from its config: no weights load."""
    from diffusers import SD3Transformer2DModel

    config = SD3Transformer2DModel.load_config(str(teacher_dir), subfolder="transformer")
    with torch.device("meta"):
        return target_suffixes(SD3Transformer2DModel.from_config(config), targets, key)


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA, as a run resolves it once (`resolve`) and passes it down: rank r, alpha (the update is scaled by
    alpha / r), dropout, and the module-name suffixes it goes on (peft's target_modules)."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]

    @classmethod
    def resolve(cls, teacher_dir, rank: int, alpha: float | None, dropout: float, targets, key: str) -> LoraSpec:
        """The spec of a params section's lora_* keys (`key`: its lora_targets, for errors): alpha None is the rank;
        a target that matches no linear layer of the teacher's transformer fails here, on its config alone."""
        return cls(rank, alpha or rank, dropout, tuple(check_targets(teacher_dir, targets, key)))

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.targets),
            init_lora_weights=True,
        )  # B = 0: the student starts as the teacher


def adapter_layers(model: torch.nn.Module) -> list:
    """peft's LoRA layers of `model` ([] for a full student: then switching adapters does nothing)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def set_adapters(layers: list, on: bool) -> None:
    # peft's own enable_adapters also flips requires_grad, which must not change between a forward and its backward
    for layer in layers:
        layer._disable_adapters = not on


@contextlib.contextmanager
def adapters(layers: list, on: bool):
    before = [layer._disable_adapters for layer in layers]
    set_adapters(layers, on)
    try:
        yield
    finally:
        for layer, off in zip(layers, before):
            layer._disable_adapters = off


def checkpointing_func(layers: list):
    """diffusers' gradient checkpointing, recomputing each block in backward with the adapters as they were in its
    forward: the student's and the teacher's passes through the one module are recomputed as themselves."""

    def run(module, *args):
        on = bool(layers) and not layers[0]._disable_adapters
        return torch.utils.checkpoint.checkpoint(
            module.__call__,
            *args,
            use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), adapters(layers, on)),
        )

    return run


class AdapterWeights(torch.nn.Module):
    """The LoRA tensors of a transformer, registered (the same tensors, not copies) under their peft names: what
    the student's optimiser, its EMA and the training checkpoint hold, so they never see the base weights."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        for name, param in transformer.named_parameters():
            if ".lora_" in name:
                self.register_parameter(name.replace(".", "__"), param)


def add_student_adapter(transformer: torch.nn.Module, spec: LoraSpec) -> tuple[AdapterWeights, list]:
    """Adapters on `transformer` (base frozen, adapters fp32 whatever the base's dtype: they are the master
    weights), resting off. Returns their weights and layers."""
    transformer.requires_grad_(False)
    transformer.add_adapter(spec.peft_config(), ADAPTER)
    weights = AdapterWeights(transformer)
    for param in weights.parameters():
        param.data = param.data.float()
    weights.requires_grad_(True)
    layers = adapter_layers(transformer)
    set_adapters(layers, False)
    return weights, layers


def fused_student(teacher_dir, spec: LoraSpec, state: dict) -> tuple[torch.nn.Module, dict]:
    """An fp32 copy of the teacher's transformer with the adapter `state` (an AdapterWeights state dict) fused
    in, and that adapter in diffusers' naming (what `save_lora_weights` writes)."""
    from peft.utils import get_peft_model_state_dict

    from ladd.pipeline import load_transformer

    transformer = load_transformer(teacher_dir)
    weights, layers = add_student_adapter(transformer, spec)
    weights.load_state_dict(state)
    set_adapters(layers, True)
    adapter = {
        k: v.detach().clone().contiguous()
        for k, v in get_peft_model_state_dict(transformer, adapter_name=ADAPTER).items()
    }
    transformer.fuse_lora()
    transformer.unload_lora()
    return transformer.requires_grad_(False), adapter


def save_adapter(out_dir: Path, adapter: dict, spec: LoraSpec) -> None:
    """`pytorch_lora_weights.safetensors`, with its LoRA config as metadata (so alpha survives loading)."""
    from diffusers import StableDiffusion3Pipeline

    metadata = {
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(spec.targets),
        "init_lora_weights": True,
    }
    StableDiffusion3Pipeline.save_lora_weights(
        out_dir, transformer_lora_layers=adapter, transformer_lora_adapter_metadata=metadata
    )
    canonicalize_safetensors(Path(out_dir) / "pytorch_lora_weights.safetensors")  # the same adapter, the same bytes


def count(weights: torch.nn.Module) -> int:
    return sum(p.numel() for p in weights.parameters())
