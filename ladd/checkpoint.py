"""Training checkpoints as one safetensors file (no pickle): module weights, optimiser states, RNG
states as tensors; step, optimiser hyper-parameters and a config fingerprint as JSON metadata.
Written atomically, so a kill at any moment leaves the previous checkpoint readable."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ladd.io import atomic_file, save_tensors


def _optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.state.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict, prefix: str) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + ".state."):
            pid, name = key[len(prefix) + 7 :].split(".", 1)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(path: str | Path, step: int, modules: dict, optimizers: dict, generators: dict, meta: dict) -> None:
    tensors, opt_meta = {}, {}
    for name, module in modules.items():
        tensors.update({f"{name}.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()})
    for name, opt in optimizers.items():
        t, m = _optimizer_tensors(opt, name)
        tensors.update(t)
        opt_meta[name] = m
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    for name, gen in generators.items():
        tensors[f"rng.{name}"] = gen.get_state()
    header = {"step": str(step), "optimizers": json.dumps(opt_meta), "meta": json.dumps(meta, sort_keys=True)}
    with atomic_file(path) as tmp:
        save_tensors(tensors, tmp, metadata=header)


def read_checkpoint_meta(path: str | Path) -> tuple[int, dict]:
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    return int(header["step"]), json.loads(header["meta"])


def load_checkpoint(path: str | Path, modules: dict, optimizers: dict, generators: dict) -> int:
    """Restore everything saved by `save_checkpoint` in place; returns the step to continue from."""
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name, module in modules.items():
        sd = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        module.load_state_dict(sd)
    opt_meta = json.loads(header["optimizers"])
    for name, opt in optimizers.items():
        _load_optimizer(opt, tensors, opt_meta[name], name)
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    for name, gen in generators.items():
        gen.set_state(tensors[f"rng.{name}"])
    return int(header["step"])
