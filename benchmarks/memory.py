"""Benchmark: static GPU memory of a LADD distillation run on the real SD3-family transformers.

    .venv/bin/python benchmarks/memory.py [--json reports/memory.json] [--measure]

SD3-medium, SD3.5-medium and SD3.5-large are built from their real `transformer/config.json` (embedded
below) on the meta device: shapes only, no weights, no download. For each model and memory setting it
prints, per GPU, the static memory of a distillation run — student, its gradients, AdamW states, EMA,
frozen teacher, discriminator heads — and whether that fits an 80 GB GPU; then the same for LoRA students
(`distill.student: lora`), which add adapters to the teacher's own bf16 weights instead of copying them.
Static only: activations, the CUDA context and allocator slack come on top. Units are GB = 1e9 bytes throughout.

The data: a last table adds what the training data costs at scale, for SD3.5-medium and -large at 1024² with
100k prompts x 4 samples: disk for the synthetic set (latents and 3 teacher path states per record, a text
embedding per distinct prompt, the records table), host RAM per rank (the records columns distill reads, the
epoch's shuffled order, the batches read ahead) and GPU memory per rank (the batch, cast to fp32 there; no text
encoder is resident: synthesize stored the embeddings), beside the static memory of the full and LoRA students.

--measure (CUDA only): a randomly initialised SD3.5-medium-shaped student (fp32 + AdamW) beside a bf16
teacher copy; peak `torch.cuda.max_memory_allocated()` and step time of one student forward/backward +
AdamW step at 512² and 1024², batch 1 and 4, with and without gradient checkpointing.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel

from ladd.config import DistillConfig
from ladd.discriminator import DiscriminatorHead, default_feature_layers
from ladd.lora import target_suffixes

GB = 1e9
GPU_GB = 80
HEAD_CHANNELS, T_EMBED_DIM = DistillConfig().head_channels, 64  # Discriminator's default t_embed_dim
TEXT_TOKENS = 77 + 256  # CLIP tokens + T5 tokens at diffusers' default max_sequence_length

# transformer/config.json of each release (the architecture keys; `_class_name`/`_diffusers_version` dropped)
CONFIGS = {
    "SD3-medium": {  # stabilityai/stable-diffusion-3-medium-diffusers
        "attention_head_dim": 64,
        "caption_projection_dim": 1536,
        "in_channels": 16,
        "joint_attention_dim": 4096,
        "num_attention_heads": 24,
        "num_layers": 24,
        "out_channels": 16,
        "patch_size": 2,
        "pooled_projection_dim": 2048,
        "pos_embed_max_size": 192,
        "sample_size": 128,
    },
    "SD3.5-medium": {  # stabilityai/stable-diffusion-3.5-medium: MMDiT-X, a second image attention in blocks 0-12
        "attention_head_dim": 64,
        "caption_projection_dim": 1536,
        "dual_attention_layers": list(range(13)),
        "in_channels": 16,
        "joint_attention_dim": 4096,
        "num_attention_heads": 24,
        "num_layers": 24,
        "out_channels": 16,
        "patch_size": 2,
        "pooled_projection_dim": 2048,
        "pos_embed_max_size": 384,
        "qk_norm": "rms_norm",
        "sample_size": 128,
    },
    "SD3.5-large": {  # stabilityai/stable-diffusion-3.5-large
        "attention_head_dim": 64,
        "caption_projection_dim": 2432,
        "in_channels": 16,
        "joint_attention_dim": 4096,
        "num_attention_heads": 38,
        "num_layers": 38,
        "out_channels": 16,
        "patch_size": 2,
        "pooled_projection_dim": 2048,
        "pos_embed_max_size": 192,
        "qk_norm": "rms_norm",
        "sample_size": 128,
    },
}


@dataclass(frozen=True)
class Setting:
    """Bytes per transformer parameter of each component. A model copy's buffers (the positional-embedding
    table) are stored in that copy's dtype; FSDP2 shards parameters only, so buffers stay whole per GPU."""

    key: str
    label: str
    student: int
    grads: int
    optimiser: int
    ema: int
    teacher: int
    ema_on_cpu: bool = False
    shards: int = 1  # FSDP2: student, grads, AdamW states and EMA split over this many GPUs


SETTINGS = [
    Setting("fp32", "fp32 everything", 4, 4, 8, 4, 4),
    Setting("bf16-teacher", "fp32 student+EMA, bf16 teacher", 4, 4, 8, 4, 2),
    Setting("ema-cpu", "as above, EMA on CPU", 4, 4, 8, 4, 2, ema_on_cpu=True),
    Setting("fsdp2x8", "as above (EMA on GPU), FSDP2 over 8 GPUs", 4, 4, 8, 4, 2, shards=8),
]
HEAD_BYTES = 4 + 4 + 8  # heads train in fp32 with AdamW and are tiny: replicated on every GPU
LORA_RANKS = (64, 256)
LORA_TARGETS = {
    "attention": ("attention",),
    "all": DistillConfig().lora_targets,
}  # diffusers' usual set; ladd's default
LORA_BYTES = 4 + 4 + 8 + 4  # per adapter parameter: fp32 weight, gradient, AdamW's two states, EMA
LORA_GPU_GB = 24  # a LoRA student of SD3.5-large should fit a 24 GB card's static budget


def count(config: dict) -> dict:
    """Parameter and buffer element counts of the transformer and of its discriminator heads, on meta."""
    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
        inner = config["num_attention_heads"] * config["attention_head_dim"]
        heads = [
            DiscriminatorHead(inner, T_EMBED_DIM + config["pooled_projection_dim"], HEAD_CHANNELS)
            for _ in default_feature_layers(config["num_layers"])
        ]
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "buffers": sum(b.numel() for b in model.buffers()),
        "heads": len(heads),
        "head_params": sum(p.numel() for h in heads for p in h.parameters()),
    }


def lora_params(config: dict, rank: int, targets) -> int:
    """Adapter parameters of a rank-`rank` LoRA on `targets` (ladd.lora's groups): rank * (in + out) per layer."""
    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
    suffixes = target_suffixes(model, targets)
    return sum(
        rank * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and any(name == s or name.endswith("." + s) for s in suffixes)
    )


def lora_footprint(n: dict, adapters: int) -> dict:
    """GB per GPU of a LoRA student: one bf16 base (student and teacher), fp32 adapters with their gradients,
    AdamW states and EMA, the heads."""
    gb = {
        "base": (n["params"] + n["buffers"]) * 2 / GB,
        "adapters": adapters * LORA_BYTES / GB,
        "heads": n["head_params"] * HEAD_BYTES / GB,
    }
    gb["total_gpu"] = sum(gb.values())
    return {**gb, "adapter_params": adapters, "fits_24": gb["total_gpu"] <= LORA_GPU_GB}


def lora_table(results: dict) -> str:
    cols = [
        "model",
        "targets",
        "LoRA rank",
        "adapter params (M)",
        "bf16 base (GB)",
        "adapters + grads + AdamW + EMA (GB)",
        "heads (GB)",
        "total / GPU (GB)",
        f"fits {LORA_GPU_GB} GB",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for name, r in results.items():
        for key, f in r["lora"].items():
            targets, rank = key.split("/r")
            lines.append(
                f"| {name} | {', '.join(LORA_TARGETS[targets])} | {rank} | {f['adapter_params'] / 1e6:.1f} | "
                f"{f['base']:.2f} | {f['adapters']:.2f} | "
                f"{f['heads']:.3f} | {f['total_gpu']:.2f} | {'yes' if f['fits_24'] else 'no'} |"
            )
    return "\n".join(lines)


def footprint(n: dict, s: Setting) -> dict:
    """GB per GPU of each component under setting s (plus the CPU RAM the setting moves off the GPU)."""
    p, b = n["params"] / s.shards, n["buffers"]
    ema = p * s.ema + b * s.ema
    gb = {
        "student": (p * s.student + b * s.student) / GB,
        "grads": p * s.grads / GB,
        "optimiser": p * s.optimiser / GB,
        "ema": 0.0 if s.ema_on_cpu else ema / GB,
        "teacher": (n["params"] + b) * s.teacher / GB,  # frozen, replicated: every GPU runs its forward
        "heads": n["head_params"] * HEAD_BYTES / GB,
    }
    gb["total_gpu"] = sum(gb.values())
    gb["cpu"] = ema / GB if s.ema_on_cpu else 0.0
    gb["fits"] = gb["total_gpu"] <= GPU_GB
    return gb


def table(results: dict) -> str:
    cols = [
        "model",
        "setting",
        "params (B)",
        "buffers (GB)",
        "student",
        "grads",
        "AdamW",
        "EMA",
        "teacher",
        "heads",
        "total / GPU",
        "CPU RAM",
        f"fits {GPU_GB} GB",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for name, r in results.items():
        for s in SETTINGS:
            f = r["settings"][s.key]
            nums = [f[k] for k in ("student", "grads", "optimiser", "ema", "teacher", "heads", "total_gpu", "cpu")]
            lines.append(
                "| "
                + " | ".join(
                    [
                        name,
                        s.label,
                        f"{r['params'] / 1e9:.2f}",
                        f"{r['buffers'] * 4 / GB:.2f}",
                        *(f"{x:.2f}" for x in nums),
                        "yes" if f["fits"] else "no",
                    ]
                )
                + " |"
            )
    return "\n".join(lines)


def measure(config: dict) -> list[dict]:
    """Peak allocated memory and time of one student step (forward, backward, AdamW) on a random model."""
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    with dev:  # random init straight on the GPU; values do not matter for memory or time
        student = SD3Transformer2DModel(**config).train()
    teacher = copy.deepcopy(student).to(torch.bfloat16).eval().requires_grad_(False)  # resident, as in distill
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6)
    n = {"params": sum(p.numel() for p in student.parameters()), "buffers": sum(b.numel() for b in student.buffers())}
    static = (n["params"] * (4 + 4 + 8 + 2) + n["buffers"] * (4 + 2)) / GB  # student, grads, AdamW, bf16 teacher

    def step(latent: int, batch: int):
        x = torch.randn(batch, config["in_channels"], latent, latent, device=dev)
        e = torch.randn(batch, TEXT_TOKENS, config["joint_attention_dim"], device=dev)
        p = torch.randn(batch, config["pooled_projection_dim"], device=dev)
        t = torch.rand(batch, device=dev) * 1000
        with torch.autocast("cuda", dtype=torch.bfloat16):  # as distill.py does on CUDA
            out = student(hidden_states=x, encoder_hidden_states=e, pooled_projections=p, timestep=t).sample
        out.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(64, 1)  # creates the AdamW states, so every row below includes them
    rows = []
    for res, batch, ckpt in itertools.product((512, 1024), (1, 4), (False, True)):
        if ckpt:
            student.enable_gradient_checkpointing()
        else:
            student.disable_gradient_checkpointing()
        row = {"resolution": res, "batch": batch, "checkpointing": ckpt, "static_gb": static}
        try:
            step(res // 8, batch)  # warm-up: kernels, allocator
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start, repeats = time.perf_counter(), 3
            for _ in range(repeats):
                step(res // 8, batch)
            torch.cuda.synchronize()
            row.update(peak_gb=torch.cuda.max_memory_allocated() / GB, step_s=(time.perf_counter() - start) / repeats)
        except torch.cuda.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            row.update(peak_gb=None, step_s=None)
        torch.cuda.empty_cache()
        rows.append(row)
    del teacher
    return rows


DATA = {
    "prompts": 100_000,
    "samples": 4,
    "resolution": 1024,
    "path_states": 3,
    "stored_bytes": 2,  # bf16
    "batch_per_rank": 4,
    "prefetch": 4,
}  # distill.prefetch on CUDA
RECORD_BYTES = 8 + 4 * 4 + 4 * 4  # the columns distill holds: seed (int64); bucket, shard, row, prompt_index; 4 CRC-32s
TABLE_BYTES_PER_RECORD = 16 * 8  # records.parquet on disk, about: those columns plus id, prompt (dictionary), label
T5_XXL_GB, CLIPS_GB = 4.76e9 * 2 / GB, 0.8e9 * 2 / GB  # bf16: what encoding per batch would keep resident


def data_footprint(config: dict, d: dict = DATA) -> dict:
    """Disk, host RAM per rank and GPU memory per rank of the training data (GB), as ladd stores and streams it."""
    side = d["resolution"] // 8  # the VAE's factor
    record = (1 + d["path_states"]) * config["in_channels"] * side * side * d["stored_bytes"]
    prompt = (TEXT_TOKENS * config["joint_attention_dim"] + config["pooled_projection_dim"]) * d["stored_bytes"]
    records = d["prompts"] * d["samples"]
    in_flight = (d["prefetch"] + 2) * d["batch_per_rank"] * (record + prompt)  # queued, being read, being trained on
    return {
        "records": records,
        "record_mb": record / 1e6,
        "prompt_mb": prompt / 1e6,
        "disk_latents": records * record / GB,
        "disk_embeddings": d["prompts"] * prompt / GB,
        "disk_table": records * TABLE_BYTES_PER_RECORD / GB,
        "host_per_rank": (records * (RECORD_BYTES + 8) + in_flight) / GB,  # + 8: the epoch's shuffled order
        "gpu_per_rank": d["batch_per_rank"] * (record + prompt) * 4 / d["stored_bytes"] / GB,
        "text_encoders_if_encoded": T5_XXL_GB + CLIPS_GB,
    }


def data_table(results: dict) -> str:
    d = DATA
    cols = [
        "model",
        "student",
        "synthetic latents + paths (GB disk)",
        "text embeddings (GB disk)",
        "records table (GB)",
        "host RAM / rank (GB)",
        "data on GPU / rank (GB)",
        "static / GPU (GB)",
        "total / GPU (GB)",
    ]
    lines = [
        f"{d['prompts']:,} prompts x {d['samples']} samples at {d['resolution']}², {d['path_states']} path states, "
        f"stored bf16; {d['batch_per_rank']} records per rank, {d['prefetch']} batches read ahead",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    for name in ("SD3.5-medium", "SD3.5-large"):
        r, f = results[name], results[name]["data"]
        full = "fsdp2x8" if not r["settings"]["bf16-teacher"]["fits"] else "bf16-teacher"
        for label, static in (
            (
                "full, FSDP2 over 8 GPUs" if full == "fsdp2x8" else "full, bf16 teacher",
                r["settings"][full]["total_gpu"],
            ),
            ("LoRA r64, every group", r["lora"]["all/r64"]["total_gpu"]),
        ):
            lines.append(
                f"| {name} | {label} | {f['disk_latents']:.0f} | {f['disk_embeddings']:.0f} | {f['disk_table']:.3f} | "
                f"{f['host_per_rank']:.2f} | {f['gpu_per_rank']:.3f} | {static:.2f} | "
                f"{static + f['gpu_per_rank']:.2f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="also write the numbers to this path")
    ap.add_argument("--measure", action="store_true", help="measure a real step on the GPU (CUDA only)")
    args = ap.parse_args(argv)

    results = {}
    for name, config in CONFIGS.items():
        n = count(config)
        results[name] = {
            **n,
            "settings": {s.key: footprint(n, s) for s in SETTINGS},
            "lora": {
                f"{key}/r{rank}": lora_footprint(n, lora_params(config, rank, targets))
                for key, targets in LORA_TARGETS.items()
                for rank in LORA_RANKS
            },
            "data": data_footprint(config),
        }
    print(
        "\nStatic memory of a LADD distillation run, GB (1e9 bytes) per GPU; activations not included. "
        "Buffers: one fp32 copy (the positional-embedding table), counted in every model copy in its dtype."
    )
    print(table(results))
    heads = next(iter(results.values()))["heads"]
    print(
        f"\nHeads: {heads} DiscriminatorHead per model (fp32 + AdamW, {HEAD_BYTES} B/param). "
        "Student: fp32 master weights (bf16 autocast for compute), gradients fp32, AdamW 2 fp32 states."
    )
    print(
        "FSDP2 row: student, gradients, AdamW and EMA parameters sharded over 8 GPUs (buffers replicated); "
        "teacher and heads replicated."
    )
    print(
        "\nLoRA students (distill.student: lora): the teacher's own weights in bf16 "
        "serve the student (adapters on) and the teacher (adapters off), no second copy; GB per GPU, static.\n"
    )
    print(lora_table(results))
    print(
        "\nNot resident: the text encoders. synthesize stored each prompt's embedding, so distill loads none "
        f"(encoding per batch would keep T5-XXL, ~4.76 B params, {T5_XXL_GB:.1f} GB in bf16, "
        "and CLIP-L + OpenCLIP-bigG, "
        f"{CLIPS_GB:.1f} GB, on every GPU). VAE, CUDA context not counted."
    )
    print("\nThe data at scale (benchmarks/scale.py measures the streaming on a CPU):\n")
    print(data_table(results))

    measured = None
    if args.measure:
        if torch.cuda.is_available():
            measured = measure(CONFIGS["SD3.5-medium"])
            print(
                f"\nMeasured on {torch.cuda.get_device_name()}: random SD3.5-medium, student fp32 + AdamW, "
                f"bf16 teacher resident, bf16 autocast, {TEXT_TOKENS} text tokens; student forward/backward + step"
            )
            print(
                "| resolution | batch | grad. checkpointing | static predicted (GB) | peak allocated (GB) | step (s) |"
            )
            print("|---|---|---|---|---|---|")
            for r in measured:
                peak = "OOM" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
                sec = "-" if r["step_s"] is None else f"{r['step_s']:.3f}"
                print(
                    f"| {r['resolution']}² | {r['batch']} | {'yes' if r['checkpointing'] else 'no'} | "
                    f"{r['static_gb']:.2f} | {peak} | {sec} |"
                )
        else:
            print("\n--measure skipped: no CUDA GPU (torch.cuda.is_available() is False).")

    out = {
        "unit": "GB (1e9 bytes)",
        "gpu_gb": GPU_GB,
        "static_only": True,
        "models": results,
        "settings": {s.key: s.label for s in SETTINGS},
        "measured": measured,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
