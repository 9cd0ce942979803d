"""The networks of a distillation run (`ladd distill`): the frozen teacher, the student initialised from it (a full
copy with fp32 master weights, or LoRA adapters on the teacher's own module), what of it trains, its EMA, the
discriminator heads on the teacher's block features, the two optimisers, and the forward passes the loop runs
through them (LADD's x0_hat = x_t - t v)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ladd import lora
from ladd.config import DistillConfig
from ladd.discriminator import Discriminator, resolve_feature_layers
from ladd.distributed import World, shard, wrap_student
from ladd.pipeline import load_transformer
from ladd.training import adamw
from ladd.variants import noise_to


@dataclass
class Networks:
    """What a run trains and judges with: the frozen teacher (may be bf16), the student (wrapped for DDP or FSDP)
    and what of it trains (all of it, or a LoRA student's adapters, whose `adapter_layers` switch them on for the
    student's passes), their EMA, the discriminator heads on the teacher's features of blocks `layers`, and the two
    optimisers."""

    teacher: torch.nn.Module
    teacher_dtype: torch.dtype
    student: torch.nn.Module
    trained: torch.nn.Module
    adapter_layers: list
    ema: torch.nn.Module
    disc: Discriminator
    layers: list[int]
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer

    def checkpointed(self) -> tuple[dict, dict]:
        """The modules and (module, optimiser) pairs a checkpoint holds, by name."""
        return (
            {"student": self.trained, "ema": self.ema, "disc": self.disc},
            {"opt_g": (self.trained, self.opt_g), "opt_d": (self.disc, self.opt_d)},
        )

    def student_velocity(self, x_t, t, c, p, m):
        """The student's v at (x_t, t), in float32; a LoRA student's adapters are on for this pass alone."""
        with lora.adapters(self.adapter_layers, on=True):
            v = self.student(
                hidden_states=torch.cat([x_t, m.to(x_t.dtype)], 1),
                encoder_hidden_states=c,
                pooled_projections=p,
                timestep=t * 1000,
            ).sample
        return v.float()

    def student_x0(self, x_t, t, c, p, m):
        """x0_hat = x_t - t v (rectified flow)."""
        return x_t - t.view(-1, 1, 1, 1) * self.student_velocity(x_t, t, c, p, m)

    @torch.no_grad()
    def teacher_x0(self, x_t, t, c, p, m):
        dtype = self.teacher_dtype
        v = self.teacher(
            hidden_states=torch.cat([x_t, m], 1).to(dtype),
            encoder_hidden_states=c.to(dtype),
            pooled_projections=p.to(dtype),
            timestep=t * 1000,
        ).sample
        return x_t - t.view(-1, 1, 1, 1) * v.float()

    def judged_features(self, x, t_hat, eps, rows, c, p, m):
        """The frozen teacher's features of the selected rows of x re-noised to t_hat (beside their condition)."""
        return self.disc.features(noise_to(x[rows], t_hat[rows], eps[rows]), t_hat[rows], c[rows], p[rows], m[rows])


def build_networks(cfg: DistillConfig, teacher_dir, teacher, plan: dict, world: World, lora_spec) -> Networks:
    """The student, wrapped for DDP or FSDP, and what of it trains: a copy of the teacher with fp32 master weights
    (all of them train), or with `student: lora` the teacher's own module with adapters (only they train). Then the
    EMA of what trains, the discriminator heads on the frozen teacher's features, and the two optimisers. Under
    FSDP the full student and EMA stay in CPU memory: fully_shard moves each block's shard to the device."""
    device, sharded = world.device, cfg.parallel == "fsdp" and world.size > 1
    trained: torch.nn.Module  # the adapters' weights, or the whole (wrapped) student
    if cfg.student == "lora":
        trained, adapter_layers = lora.add_student_adapter(teacher, lora_spec)
        # one copy of the base weights (so checkpointing it covers the teacher's passes too); train mode only
        # switches lora_dropout, which the teacher's passes (adapters off) never run
        student = teacher.train()
    else:
        trained = student = load_transformer(teacher_dir, "cpu" if sharded else device).train().requires_grad_(True)
        adapter_layers = []
    ema = copy.deepcopy(trained).requires_grad_(False).to("cpu" if plan["ema_on_cpu"] or sharded else device)
    if plan["gradient_checkpointing"] in ("student", "all"):
        student.enable_gradient_checkpointing(lora.checkpointing_func(adapter_layers) if adapter_layers else None)
    if plan["gradient_checkpointing"] == "all" and student is not teacher:  # the student's gradient flows through
        teacher.enable_gradient_checkpointing()  # the teacher's forward
    student = wrap_student(student, cfg.parallel, world, plan["mixed_precision"] == "bf16")
    if cfg.student == "full":
        trained = student
    if sharded:
        ema = shard(ema, world)  # the EMA keeps the student's shards: its update stays local
    layers = resolve_feature_layers(cfg.feature_layers, teacher.config.num_layers)
    disc = Discriminator(teacher, layers, cfg.head_channels, truncate=plan["truncate_teacher"]).to(device)
    world.copy_from_rank0(disc)  # the replicated heads start equal (their init is seeded the same on every rank)
    opt_g = adamw(trained.parameters(), lr=cfg.lr_g, betas=cfg.betas, weight_decay=cfg.weight_decay)
    opt_d = adamw(disc.parameters(), lr=cfg.lr_d, betas=cfg.betas, weight_decay=cfg.weight_decay)
    teacher_dtype = getattr(torch, plan["teacher_dtype"])
    return Networks(teacher, teacher_dtype, student, trained, adapter_layers, ema, disc, layers, opt_g, opt_d)
