"""Many processes for the heavy stages: the launcher that starts `ladd <stage>` again under torchrun, the
process group, the student replicated (DDP) or sharded (FSDP2), the small replicated heads' gradients
averaged, and full state dicts gathered for checkpoints and the saved pipeline.

Every rank draws the *global* batch from the same seeded stream and trains on its own rows of it. So the
random stream, and with it a checkpoint, does not depend on the world size: 2 ranks x half a batch compute
what 1 rank computes on the whole batch, up to the order of floating-point sums, and a checkpoint resumes
on any number of processes. The price is drawing the whole batch's noise on every rank (CPU randn).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ladd.config import Params
from ladd.errors import ConfigError
from ladd.pipeline import pick_device

log = logging.getLogger(__name__)


@dataclass
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This rank's rows of a global batch of n."""
        if n % self.size:
            raise ConfigError(f"the global batch ({n}) must divide evenly over {self.size} processes")
        per = n // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over ranks (a copy; the input itself where there is one rank)."""
        if self.size == 1:
            return values
        out = values.detach().clone()
        dist.all_reduce(out)
        return out / self.size

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_batches(self, local: torch.Tensor, n: int, batch_size: int) -> torch.Tensor | None:
        """Rows 0..n-1 in order on rank 0 (None elsewhere), from each rank's every-world-size-th batch of
        `batch_size` rows (`generate_latents(share=...)`)."""
        if self.size == 1:
            return local
        parts = [None] * self.size if self.main else None
        dist.gather_object(local.cpu(), parts, dst=0)
        if not self.main:
            return None
        offsets, out = [0] * self.size, []
        for j, start in enumerate(range(0, n, batch_size)):
            r, rows = j % self.size, min(batch_size, n - start)
            out.append(parts[r][offsets[r] : offsets[r] + rows])
            offsets[r] += rows
        return torch.cat(out)

    def average_gradients(self, params) -> None:
        """All-reduce (mean) the gradients of replicated parameters, as one flat buffer. A rank whose batch left
        them without a gradient joins with zeros (every rank must reach the all-reduce)."""
        if self.size == 1:
            return
        params = list(params)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.size
        for g, averaged in zip(grads, torch.split(flat, [g.numel() for g in grads])):
            g.copy_(averaged.view_as(g))

    def copy_from_rank0(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers in every rank's copy of a replicated module."""
        if self.size > 1:
            for v in module.state_dict().values():
                dist.broadcast(v, src=0)

    def check_replicas(self, module: torch.nn.Module) -> None:
        """RuntimeError unless every rank holds the same bytes (DDP and the averaged heads keep replicas equal by
        construction; a diverged replica would mean a rank trained on other data or skipped an update)."""
        if self.size == 1:
            return
        h = hashlib.sha256()
        for name, v in module.state_dict().items():
            h.update(name.encode())
            h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        digests = [None] * self.size
        dist.all_gather_object(digests, h.hexdigest())
        if len(set(digests)) != 1:
            raise RuntimeError(f"{type(module).__name__} differs between ranks after training: {digests}")


def init_world(device_name: str) -> World:
    """The process group when torchrun started several processes (gloo on CPU, NCCL on CUDA), else one rank."""
    size = int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(device_name)
    if size == 1:
        return World(0, 1, 0, device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"process {local_rank} of this node has no GPU: {torch.cuda.device_count()} visible, "
                "launch.nproc_per_node must not exceed them"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():  # a stage waits at barriers for the slowest rank's share of the work
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    return World(dist.get_rank(), size, local_rank, device)


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def wrap_student(student: torch.nn.Module, parallel: str, world: World, bf16: bool) -> torch.nn.Module:
    """`none` and one process: as is; `ddp`: replicas with bucketed gradient all-reduce; `fsdp`: FSDP2,
    each MMDiT block sharded, then the root, fp32 master shards with bf16 compute under mixed precision."""
    if parallel == "none" or world.size == 1:
        return student
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(student, device_ids=[world.local_rank] if world.device.type == "cuda" else None)
    return shard(student, world, bf16)


def shard(module: torch.nn.Module, world: World, bf16: bool = False) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(world.device.type, (world.size,))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    )
    for block in module.transformer_blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    return fully_shard(module, mesh=mesh, mp_policy=policy)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)  # DDP keeps the model as .module


def is_sharded(module: torch.nn.Module) -> bool:
    return any(hasattr(p, "full_tensor") for p in module.parameters())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_state_dict(module: torch.nn.Module) -> dict:
    """The plain (unsharded, CPU) state dict; collective for a sharded module, whose full copy only rank 0 gets."""
    if not is_sharded(module):
        return unwrap(module).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(module: torch.nn.Module, state: dict) -> None:
    """Inverse of `full_state_dict`: rank 0's full copy broadcast into every rank's shards."""
    if not is_sharded(module):
        unwrap(module).load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def full_optimizer_state(module: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimiser's state dict in `torch.optim`'s own layout (integer ids in parameter order), whatever the
    sharding; collective for a sharded module (only rank 0's copy is full)."""
    if not is_sharded(module):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sd = get_optimizer_state_dict(module, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not sd:  # ranks other than 0
        return {}
    ids = {name: i for i, name in enumerate(n for g in sd["param_groups"] for n in g["params"])}
    groups = [{**g, "params": [ids[n] for n in g["params"]]} for g in sd["param_groups"]]
    return {"state": {ids[n]: s for n, s in sd["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(module: torch.nn.Module, opt: torch.optim.Optimizer, sd: dict) -> None:
    if not is_sharded(module):
        opt.load_state_dict(sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [n for n, _ in module.named_parameters()]
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in sd.get("param_groups", [])]
    named = {"state": {names[int(i)]: s for i, s in sd.get("state", {}).items()}, "param_groups": groups}
    set_optimizer_state_dict(
        module, opt, named, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )


def sharded_state(module: torch.nn.Module, opt: torch.optim.Optimizer | None = None) -> dict:
    """This rank's own part of a module's state dict (DTensor shards under FSDP), or of its optimiser's per-parameter
    states keyed by parameter name: what a sharded checkpoint writes, with no gathering."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return get_model_state_dict(module) if opt is None else get_optimizer_state_dict(module, opt)["state"]


def load_sharded_state(module: torch.nn.Module, state: dict, opt: torch.optim.Optimizer | None = None) -> None:
    """Inverse of `sharded_state` (the optimiser keeps its current hyper-parameters: the run's config)."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if opt is None:
        set_model_state_dict(module, state)
    else:
        groups = get_optimizer_state_dict(module, opt)["param_groups"]
        set_optimizer_state_dict(module, opt, {"state": state, "param_groups": groups})


# --- the launcher: `ladd <stage>` started again under torchrun ------------------------------------------------

EXIT_DIR = "LADD_EXIT_DIR"  # set by the launcher: where workers leave their exit codes


def torchrun_command(argv: list[str], launch) -> list[str]:
    """The same `ladd` command, started on nproc_per_node processes of this node by torchrun (one rendezvous
    for every node)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(launch.nproc_per_node),
        "--nnodes",
        str(launch.nnodes),
    ]
    if launch.rdzv_endpoint:
        cmd += [
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            launch.rdzv_endpoint,
            "--rdzv_id",
            launch.rdzv_id,
            "--rdzv_conf",
            f"join_timeout={launch.rdzv_timeout}",
        ]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "ladd.cli", *argv]


def wait_for_rendezvous(endpoint: str, timeout: int) -> None:
    """On a node that does not host the rendezvous (the first node does), wait until its endpoint answers;
    ConfigError naming it after `timeout` seconds, before any process starts."""
    import socket
    import time

    host, _, port = endpoint.rpartition(":")
    try:
        address = socket.gethostbyname(host)
        local = {"0.0.0.0", *socket.gethostbyname_ex(socket.gethostname())[2]}
    except OSError as e:
        raise ConfigError(f"launch.rdzv_endpoint {endpoint}: cannot resolve {host} ({e})") from None
    if address.startswith("127.") or address in local:
        return  # torchrun on this node hosts it
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((address, int(port)), timeout=min(5, timeout)).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"launch.rdzv_endpoint {endpoint} did not answer within {timeout} s: start the "
                    "first node (it hosts the rendezvous), or fix the address"
                ) from None
            time.sleep(1)


def _stop_with_parent() -> None:
    """In torchrun's process: SIGTERM when this launcher dies, even by SIGKILL (Linux), so torchrun stops its
    workers instead of training on as orphans beside the next run."""
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def peer_failed(e: RuntimeError) -> bool:
    """A collective broken because another process of a torchrun job ended (its own error says why)."""
    return int(os.environ.get("WORLD_SIZE", 1)) > 1 and (
        isinstance(e, getattr(dist, "DistError", ())) or ("gloo" in str(e) and "peer" in str(e))
    )


def launch_workers(stage: str, argv: list[str], params: Params) -> int:
    """Run `stage` under torchrun as params.yaml's `launch` section says; fails before starting anything when
    this node has fewer GPUs than processes."""
    import subprocess
    import tempfile

    launch, device = params.launch, getattr(params, stage).device
    processes = launch.nproc_per_node * launch.nnodes
    if stage == "distill" and params.distill.parallel == "none":
        raise ConfigError(f"distill.parallel is none but launch asks for {processes} processes: use ddp or fsdp")
    if stage == "distill" and params.distill.batch_size % processes:
        raise ConfigError(
            f"distill.batch_size ({params.distill.batch_size}) is the global batch: it must divide evenly "
            f"over launch's {processes} processes"
        )
    gpus = torch.cuda.device_count()
    if (device.startswith("cuda") or (device == "auto" and gpus)) and launch.nproc_per_node > gpus:
        raise ConfigError(f"launch.nproc_per_node is {launch.nproc_per_node} but this node has {gpus} GPUs")
    if launch.rdzv_endpoint:
        wait_for_rendezvous(launch.rdzv_endpoint, launch.rdzv_timeout)
    cmd = torchrun_command(argv, launch)
    log.info("%s: %d processes per node x %d nodes: %s", stage, launch.nproc_per_node, launch.nnodes, " ".join(cmd))
    report: list[str] = []  # torchrun's own failure report (a traceback and a table): shown only if no worker said why
    with tempfile.TemporaryDirectory(prefix="ladd-exit-") as codes:  # each failing worker leaves its exit code
        proc = subprocess.Popen(
            cmd,
            preexec_fn=_stop_with_parent,
            env={**os.environ, EXIT_DIR: codes},
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        try:
            for line in proc.stderr:  # the workers' output passes through as it comes
                if report or line.startswith("Traceback (most recent call last):"):  # workers' lines carry [rankN]
                    report.append(line)
                else:
                    sys.stderr.write(line)
            code = proc.wait()
        except KeyboardInterrupt:  # torchrun got the same SIGINT and stops its workers
            proc.wait()
            raise
        worker_codes = {f.name: int(f.read_text()) for f in sorted(Path(codes).iterdir())}
    if code and worker_codes:  # rank 0's code (else the first): exit codes mean what they mean without torchrun
        return worker_codes.get("rank-0", next(iter(worker_codes.values())))
    if code:  # a worker killed (SIGKILL, out of memory) before it could say why
        sys.stderr.writelines(report)
        print(
            f"ladd {stage}: a process under torchrun failed (torchrun exit {code}); see its output above",
            file=sys.stderr,
        )
    return code


def report_exit_code(code: int) -> None:
    """In a torchrun worker: leave this process's exit code for `launch_workers`."""
    if os.environ.get(EXIT_DIR):
        Path(os.environ[EXIT_DIR], f"rank-{os.environ['RANK']}").write_text(str(code))
