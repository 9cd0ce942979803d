"""Which checkpoint a distill run resumes (its own settings' newest, one file or FSDP shards; others moved aside,
never overwritten), and loading it into the run's modules, optimisers and data RNG."""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path

import torch

from ladd.checkpoint import load_checkpoint, load_sharded_checkpoint, read_checkpoint_meta
from ladd.distributed import (
    World,
    is_sharded,
    load_full_optimizer_state,
    load_full_state_dict,
    load_sharded_state,
    sharded_state,
)
from ladd.errors import ConfigError

log = logging.getLogger(__name__)


def sharded_checkpoint_path(checkpoint: str | Path) -> Path:
    """Where FSDP runs write their sharded checkpoint: a folder beside `distill.checkpoint`."""
    return Path(checkpoint).with_suffix(".dcp")


def resume_point_on_rank0(
    checkpoint: str | Path, steps: int, run: dict, world: World
) -> tuple[Path | None, list[tuple[Path, Path]]]:
    """The checkpoint to resume (`resumable`), decided by rank 0 alone and told to every rank: the newer of
    `distill.checkpoint` and the sharded folder, so a run may change strategy and world size. Also the moves
    aside (source, target) of checkpoints that are not this run's: `move_aside` makes them when the run writes
    its first checkpoint, so a run that fails before that changes no file."""
    verdict = None
    if world.main:
        try:
            found = [p for p in (Path(checkpoint), sharded_checkpoint_path(checkpoint)) if p.exists()]
            newest = max(found, key=lambda p: p.stat().st_mtime, default=None)
            aside = resumable(newest, steps, run) if newest is not None else None
            verdict = (newest if newest is not None and aside is None else None, [aside] if aside else [])
        except ConfigError as e:
            verdict = e
    verdict = world.broadcast(verdict)
    if isinstance(verdict, ConfigError):
        raise verdict
    return verdict


def move_aside(moves: list[tuple[Path, Path]]) -> None:
    """Make the moves `resume_point_on_rank0` decided (rank 0, before writing the first checkpoint), once."""
    while moves:
        source, target = moves.pop()
        if source.exists():
            os.replace(source, target)


def resumable(path: Path, steps: int, run: dict) -> tuple[Path, Path] | None:
    """None when the checkpoint at `path` is this run's to resume; else where it moves aside. One written for other
    settings or data is not (training starts over; it is kept as `<name>.stale-N`, never overwritten: it may be the
    only copy of a long run); an unreadable one goes to `<name>.corrupt`; one past `distill.steps` is an error
    (resuming it would train nothing and relabel its weights)."""
    try:
        saved_step, saved_run = read_checkpoint_meta(path)
    except Exception as e:  # torn or foreign file (the writer is atomic, so not ours mid-write)
        aside = path.with_name(path.name + ".corrupt")
        log.warning(
            "distill: checkpoint %s is unreadable (%s): moved to %s at this run's first checkpoint, starting "
            "from step 0",
            path,
            e,
            aside,
        )
        return path, aside
    if saved_run != run:
        aside = next(p for n in itertools.count(1) if not (p := path.with_name(f"{path.name}.stale-{n}")).exists())
        changed = ", ".join(k for k in sorted(set(run) | set(saved_run)) if run.get(k) != saved_run.get(k))
        log.warning(
            "distill: %s was written for other settings or data (%s): moved to %s at this run's first "
            "checkpoint, starting from step 0",
            path,
            changed,
            aside,
        )
        return path, aside
    if saved_step > steps:
        raise ConfigError(
            f"distill.steps is {steps} but {path} is at step {saved_step}: raise distill.steps, or "
            "move the checkpoint away to train from step 0"
        )
    return None


def resume_state(path: Path, modules: dict, optimizers: dict, gen: torch.Generator, world: World) -> int:
    """The checkpoint's step after loading its weights, optimisers and data RNG into place. A sharded folder: every
    rank reads its own shards (resharded to this run's layout). One file under FSDP: rank 0 alone reads the
    student, EMA and their optimiser, and scatters them."""
    if path.is_dir():  # the student, EMA and their optimiser in shards, resharded to this run's layout
        start, states, opt_states = load_checkpoint(path, ["disc"], ["opt_d"], {"data": gen})
        (student, opt_g), ema = optimizers["opt_g"], modules["ema"]
        shards = {"student": sharded_state(student), "ema": sharded_state(ema), "opt_g": sharded_state(student, opt_g)}
        load_sharded_checkpoint(path, shards)
        load_sharded_state(student, shards["student"])
        load_sharded_state(ema, shards["ema"])
        load_sharded_state(student, shards["opt_g"], opt_g)
        load_full_state_dict(modules["disc"], states["disc"])
        load_full_optimizer_state(modules["disc"], optimizers["opt_d"][1], opt_states["opt_d"])
    else:
        sharded = any(is_sharded(m) for m in modules.values())
        start, states, opt_states = load_checkpoint(
            path,
            list(modules) if world.main or not sharded else ["disc"],
            list(optimizers) if world.main or not sharded else ["opt_d"],
            {"data": gen},
        )
        for name, module in modules.items():
            load_full_state_dict(module, states.get(name, {}))
        for name, (module, opt) in optimizers.items():
            load_full_optimizer_state(module, opt, opt_states.get(name, {}))
    log.info("distill: resuming from %s at step %d", path, start)
    return start
