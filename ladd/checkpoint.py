"""Training checkpoints without pickle, written atomically (a kill at any moment leaves the previous one readable).

One safetensors file: module weights, optimiser states, RNG states as tensors; step, optimiser
hyper-parameters and a config fingerprint as JSON metadata. It holds full (gathered) state dicts in
torch.optim's own layout, so it does not depend on the number of processes or the sharding
(`ladd.distributed` gathers and scatters them).

A sharded checkpoint (FSDP2): a folder where every rank writes its own shards of the sharded modules and
optimiser through `torch.distributed.checkpoint` as safetensors (`HuggingFaceStorageWriter`), so no rank
ever holds the full state, beside one file as above for the replicated rest (heads, their optimiser, RNG,
step, fingerprint). `torch.distributed.checkpoint` reshards on load: it resumes on any number of processes."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import safe_open

from ladd.io import atomic_dir, atomic_file, save_tensors

REPLICATED = "replicated.safetensors"  # inside a sharded checkpoint: what every rank holds the same


def _optimizer_tensors(sd: dict, prefix: str) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.state.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict, meta: dict, prefix: str) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + ".state."):
            pid, name = key[len(prefix) + 7 :].split(".", 1)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    path: str | Path,
    step: int,
    states: dict[str, dict],
    optimizers: dict[str, dict],
    generators: dict[str, torch.Generator],
    meta: dict,
) -> None:
    """`states`: module state dicts by name; `optimizers`: optimiser state dicts by name."""
    tensors, opt_meta = {}, {}
    for name, sd in states.items():
        tensors.update({f"{name}.{k}": v.detach().cpu().contiguous() for k, v in sd.items()})
    for name, sd in optimizers.items():
        t, m = _optimizer_tensors(sd, name)
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
    path = Path(path)
    with safe_open(str(path / REPLICATED if path.is_dir() else path), "pt") as f:
        header = f.metadata()
    return int(header["step"]), json.loads(header["meta"])


def load_checkpoint(
    path: str | Path, states: list[str], optimizers: list[str], generators: dict[str, torch.Generator]
) -> tuple[int, dict, dict]:
    """(step, the named module and optimiser state dicts) saved by `save_checkpoint`, reading only those; RNG
    states are restored in place. For a sharded checkpoint: its replicated part."""
    path = Path(path) / REPLICATED if Path(path).is_dir() else path
    wanted = tuple(f"{name}." for name in [*states, *optimizers, "rng"])
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(wanted)}
    module_states = {
        name: {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")} for name in states
    }
    opt_meta = json.loads(header["optimizers"])
    optimizer_states = {name: _optimizer_state(tensors, opt_meta[name], name) for name in optimizers}
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    for name, gen in generators.items():
        gen.set_state(tensors[f"rng.{name}"])
    return int(header["step"]), module_states, optimizer_states


def save_sharded_checkpoint(
    path: str | Path,
    step: int,
    sharded: dict[str, dict],
    states: dict[str, dict],
    optimizers: dict[str, dict],
    generators: dict[str, torch.Generator],
    meta: dict,
    world,
) -> None:
    """Collective. `sharded`: this rank's state dicts (DTensor shards) by name, written by every rank at once;
    the rest as `save_checkpoint` writes it, by rank 0. The folder replaces the previous one when all is written."""
    import torch.distributed.checkpoint as dcp

    with atomic_dir(path) if world.main else nullcontext() as tmp:
        tmp = world.broadcast(str(tmp) if world.main else None)
        dcp.save(sharded, storage_writer=dcp.HuggingFaceStorageWriter(tmp, save_distributed=True))
        if world.main:
            save_checkpoint(Path(tmp) / REPLICATED, step, states, optimizers, generators, meta)
    world.barrier()


def load_sharded_checkpoint(path: str | Path, sharded: dict[str, dict]) -> None:
    """Fill `sharded` (state dicts of this rank's layout, sharded or not, as `save_sharded_checkpoint` names them) in
    place from the folder's shards, whatever number of processes wrote them. Collective under a process group."""
    import torch.distributed.checkpoint as dcp

    dcp.load(sharded, storage_reader=dcp.HuggingFaceStorageReader(str(path)))
