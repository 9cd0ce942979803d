"""The prepared GPU check: one call on one H100/H200 (about 7 minutes), one table.

    python benchmarks/gpu_check.py [--out /tmp/gpu_check] [--json reports/gpu_check.json]
    python benchmarks/gpu_check.py --dry-run        # the same code on tiny shapes on the CPU (the suite runs it)

1. A teacher folder shaped like SD3.5-medium: its real transformer config (benchmarks/memory.py) with random
   weights saved in bf16, one-layer text encoders of the real widths (CLIP-L 768, CLIP-G 1280, T5 4096 with 256
   tokens), a small 16-channel VAE. A prompts-only project: `synthesize` (2 Euler steps, CFG 2) at 512² and 1024².
2. `distill` itself for each student (full, LoRA rank 64), resolution and batch (2 and 4: `distill.batch_size`
   refuses 1, where the hinge loss degenerates): 8 steps, bf16 autocast, bf16 teacher, gradient checkpointing of
   student and teacher, text encoders released. Steady-state s/step, peak `torch.cuda.max_memory_allocated`, and
   MFU: 3x the student's forward FLOPs (counted by torch's FlopCounterMode on the meta device) per step over the
   GPU's dense bf16 peak; the teacher's passes are real work left out, so MFU reads low.
3. DDP through NCCL on the one GPU: one process group of one rank, a 2-block student of the same widths wrapped
   in DistributedDataParallel; its gradient against the unwrapped model's.
4. ONNX Runtime's CUDA provider: the `export` stage on a 2-block student of the same widths (fp32 and fp16
   graphs), parity and latency at batch 1 and 16 against eager PyTorch on the GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import socket
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the project's builder of SD3-family folders

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline  # noqa: E402
from machine import describe  # noqa: E402
from memory import CONFIGS  # noqa: E402
from sd3_family import VAE_SCALE, VAE_SHIFT, _clip, t5_tokenizer  # noqa: E402
from transformers import T5Config, T5EncoderModel  # noqa: E402

from ladd.config import DistillConfig, ExportConfig, PrepareConfig, SynthesizeConfig  # noqa: E402
from ladd.data.prepare import prepare  # noqa: E402
from ladd.distill import distill  # noqa: E402
from ladd.export import export_stage  # noqa: E402
from ladd.pipeline import write_meta  # noqa: E402
from ladd.synthesize import synthesize  # noqa: E402
from ladd.tokenizer import write_clip_tokenizer  # noqa: E402
from ladd.tracking import NullTracker  # noqa: E402

PROMPTS = [
    f"a photo of {w}"
    for w in (
        "a cat",
        "a dog",
        "a red car",
        "two apples",
        "a lighthouse",
        "a forest",
        "a city at night",
        "a bowl of soup",
    )
]
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense tensor-core FLOP/s
# the check at full size, and its dry run: the same steps on shapes the CPU runs in seconds
SIZES = {
    "gpu": dict(
        transformer=CONFIGS["SD3.5-medium"],
        clip=(768, 1280),
        t5=4096,
        clip_tokens=77,
        t5_tokens=256,
        resolutions=(512, 1024),
        batches=(2, 4),
        steps=8,
        lora_rank=64,
        ort_batches=(1, 16),
    ),
    "dry": dict(
        transformer=dict(
            sample_size=8,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=3,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=64,
            caption_projection_dim=32,
            pooled_projection_dim=48,
            pos_embed_max_size=16,
            qk_norm="rms_norm",
            dual_attention_layers=(0,),
        ),
        clip=(16, 32),
        t5=64,
        clip_tokens=8,
        t5_tokens=12,
        resolutions=(64, 128),
        batches=(2,),
        steps=7,
        lora_rank=4,
        ort_batches=(1, 2),
    ),
}


def build_teacher(out: Path, transformer: dict, clip: tuple, t5: int, clip_tokens: int, t5_tokens: int, device) -> Path:
    """A StableDiffusion3Pipeline folder: the given transformer with random weights (saved bf16 on the GPU), one-
    layer text encoders of the given widths, a small VAE with SD3's latent layout."""
    words = sorted({w for p in PROMPTS for w in p.split()})
    clip_tok = write_clip_tokenizer(out / "_tok", words, clip_tokens)
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=VAE_SHIFT,
        scaling_factor=VAE_SCALE,
    )
    with torch.device(device):
        mmdit = SD3Transformer2DModel(**transformer)
    t5_tok = t5_tokenizer(words, t5_tokens)
    t5_model = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=t5,
            d_kv=64,
            d_ff=1024,
            num_layers=1,
            num_heads=max(1, t5 // 64),
            feed_forward_proj="gated-gelu",
            pad_token_id=t5_tok.pad_token_id,
            eos_token_id=t5_tok.eos_token_id,
            decoder_start_token_id=t5_tok.pad_token_id,
        )
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=mmdit,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=_clip(clip_tok, clip[0], 3),
        tokenizer=clip_tok,
        text_encoder_2=_clip(clip_tok, clip[1], 4),
        tokenizer_2=copy.deepcopy(clip_tok),
        text_encoder_3=t5_model,
        tokenizer_3=t5_tok,
    )
    if torch.device(device).type == "cuda":
        pipe.transformer.to(torch.bfloat16)
    pipe.save_pretrained(out / "teacher", safe_serialization=True)
    write_meta(out / "teacher", max_sequence_length=t5_tokens, source="gpu_check")  # the T5 slot the FLOPs count
    shutil.rmtree(out / "_tok")
    return out / "teacher"


def student_flops(transformer: dict, latent: int, batch: int, text_tokens: int) -> float:
    """3x the forward FLOPs of the student at these shapes (forward + backward), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = SD3Transformer2DModel(**transformer)
        inputs = dict(
            hidden_states=torch.empty(batch, transformer["in_channels"], latent, latent),
            encoder_hidden_states=torch.empty(batch, text_tokens, transformer["joint_attention_dim"]),
            pooled_projections=torch.empty(batch, transformer["pooled_projection_dim"]),
            timestep=torch.empty(batch),
        )
        with FlopCounterMode(display=False) as counter:
            model(**inputs)
    return 3.0 * counter.get_total_flops()


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def ddp_check(transformer: dict, device: torch.device, latent: int, text_tokens: int) -> dict:
    """One rank's DistributedDataParallel step over NCCL (gloo on the CPU) against the bare model's gradient."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        small = {**transformer, "num_layers": 2, "dual_attention_layers": ()}
        with torch.device(device):
            model = SD3Transformer2DModel(**small)
        bare = copy.deepcopy(model)
        ddp = DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == "cuda" else None)
        g = torch.Generator(device).manual_seed(0)
        x = torch.randn(2, small["in_channels"], latent, latent, device=device, generator=g)
        e = torch.randn(2, text_tokens, small["joint_attention_dim"], device=device, generator=g)
        p = torch.randn(2, small["pooled_projection_dim"], device=device, generator=g)
        t = torch.rand(2, device=device, generator=g) * 1000
        times = {}
        for name, net in (("ddp", ddp), ("bare", bare)):
            for _ in range(2):  # the second pass is timed
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                net.zero_grad()
                net(
                    hidden_states=x, encoder_hidden_states=e, pooled_projections=p, timestep=t
                ).sample.square().mean().backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name] = time.perf_counter() - start
        error = max(float((a.grad - b.grad).abs().max()) for a, b in zip(model.parameters(), bare.parameters()))
        return {"backend": backend, "grad_max_abs_diff": error, "step_s": times["ddp"], "bare_step_s": times["bare"]}
    finally:
        dist.destroy_process_group()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/gpu_check")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: the code path, not the figures")
    args = ap.parse_args(argv)
    size = SIZES["dry" if args.dry_run else "gpu"]
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); --dry-run runs on the CPU")
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    clock, phases = time.perf_counter(), {}
    text_tokens = size["clip_tokens"] + size["t5_tokens"]
    teacher = build_teacher(
        out, size["transformer"], size["clip"], size["t5"], size["clip_tokens"], size["t5_tokens"], device
    )
    prompts = out / "prompts.csv"
    pd.DataFrame({"prompt": PROMPTS}).to_csv(prompts, index=False)
    prepare(PrepareConfig(source="prompts", captions=str(prompts), out_dir=str(out / "data"), test_fraction=0.25))
    synthetic = {}
    for res in size["resolutions"]:
        cfg = SynthesizeConfig(
            out_dir=str(out / f"synthetic{res}"),
            steps=2,
            samples_per_prompt=2,
            guidance=2.0,
            batch_size=4,
            resolutions=((res, res),),
            trajectory_times=(0.7934400439, 0.4565599561, 0.25),
            device=device.type,
        )
        synthesize(cfg, out / "data", teacher, NullTracker())
        synthetic[res] = cfg.out_dir
    phases["build + synthesize"] = time.perf_counter() - clock
    peak = peak_flops()
    rows = []
    memory = (
        dict(gradient_checkpointing="all", mixed_precision="bf16", teacher_dtype="bfloat16")
        if device.type == "cuda"
        else dict(gradient_checkpointing="all", mixed_precision="no", teacher_dtype="float32")
    )
    for student in ("full", "lora"):
        for res in size["resolutions"]:
            for batch in size["batches"]:
                clock = time.perf_counter()
                run = out / f"{student}{res}b{batch}"
                cfg = DistillConfig(
                    out_dir=str(run / "student"),
                    checkpoint=str(run / "ck.safetensors"),
                    report_dir=str(run),
                    steps=size["steps"],
                    batch_size=batch,
                    warmup_steps=0,
                    checkpoint_every=10_000,
                    log_every=1,
                    device=device.type,
                    student=student,
                    lora_rank=size["lora_rank"],
                    lr_g=3e-4 if student == "lora" else 3e-5,
                    **memory,
                )
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                facts = distill(cfg, teacher, synthetic[res], NullTracker())
                flops = student_flops(size["transformer"], res // 8, batch, text_tokens)
                rows.append(
                    {
                        "check": "LADD step",
                        "student": student if student == "full" else f"LoRA r{size['lora_rank']}",
                        "resolution": res,
                        "batch": batch,
                        "step_s": facts["sec_per_step"],
                        "peak_gb": facts.get("peak_memory_gb"),
                        "trained_params": facts["trained_parameters"],
                        "mfu": flops / facts["sec_per_step"] / peak if peak else None,
                    }
                )
                if student == "full" and res == size["resolutions"][0] and batch == size["batches"][0]:
                    kept = run / "student"  # exported below when no smaller student is built
                else:
                    shutil.rmtree(run, ignore_errors=True)
                phases[f"distill {student} {res} b{batch}"] = time.perf_counter() - clock
    clock = time.perf_counter()
    ddp = ddp_check(size["transformer"], device, size["resolutions"][0] // 8, text_tokens)
    rows.append(
        {
            "check": f"DDP ({ddp['backend']}, 1 rank)",
            "student": "full, 2 blocks",
            "resolution": size["resolutions"][0],
            "batch": 2,
            "step_s": ddp["step_s"],
            "grad_diff": ddp["grad_max_abs_diff"],
            "note": f"grad max |DDP - bare| {ddp['grad_max_abs_diff']:.1e}; bare step {ddp['bare_step_s']:.3f} s",
        }
    )
    phases["ddp"] = time.perf_counter() - clock
    clock = time.perf_counter()
    # ONNX: a 2-block student of the same widths (a 2B graph's export alone takes minutes)
    small_teacher = (
        build_teacher(
            out / "small",
            {**size["transformer"], "num_layers": 2, "dual_attention_layers": ()},
            size["clip"],
            size["t5"],
            size["clip_tokens"],
            size["t5_tokens"],
            device,
        )
        if not args.dry_run
        else teacher
    )
    res = size["resolutions"][0]
    if not args.dry_run:
        cfg = DistillConfig(
            out_dir=str(out / "small" / "student"),
            checkpoint=str(out / "small" / "ck.safetensors"),
            report_dir=str(out / "small"),
            steps=2,
            batch_size=2,
            warmup_steps=0,
            device="cuda",
            **memory,
        )
        distill(cfg, small_teacher, synthetic[res], NullTracker())
        kept = out / "small" / "student"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # eager fp32 as the reference
    export_stage(
        ExportConfig(
            out_dir=str(out / "onnx"),
            single_file_dir=str(out / "single_file"),
            report=str(out / "export.json"),
            steps=4,
            fp16=True,
            batch_sizes=size["ort_batches"],
            latency_repeats=5,
            tolerance=5e-2,
            provider="cpu" if args.dry_run else "cuda",
            register=False,
            prompts=tuple(PROMPTS),
        ),
        kept,
        NullTracker(),
    )
    report = json.loads((out / "export.json").read_text())
    fp16, graphs = report.get("fp16") or {}, "the full student above" if args.dry_run else "2 blocks"
    for b in size["ort_batches"]:
        lat = report["latency"][str(b)]
        rows.append(
            {
                "check": f"ONNX Runtime fp32 ({report['provider']})",
                "student": graphs,
                "resolution": res,
                "batch": b,
                "latency_ms": lat["ort_ms"],
                "note": f"eager {lat['torch_ms']:.1f} ms; "
                f"max abs error vs eager {max(report['parity'][str(b)].values()):.1e}",
            }
        )
        if str(b) in fp16.get("per_batch", {}):
            half = fp16["per_batch"][str(b)]
            rows.append(
                {
                    "check": f"ONNX Runtime fp16 ({fp16['provider']})",
                    "student": graphs,
                    "resolution": res,
                    "batch": b,
                    "latency_ms": half["ort_ms"],
                    "note": f"eager fp32 {lat['torch_ms']:.1f} ms; "
                    f"latents max abs error vs it {half['latents_max_abs_error']:.1e}",
                }
            )
    if fp16.get("error"):
        rows.append(
            {
                "check": "ONNX Runtime fp16",
                "student": graphs,
                "resolution": res,
                "batch": 0,
                "latency_ms": float("nan"),
                "note": f"did not run: {fp16['error'][:120]}",
            }
        )
    phases["onnx"] = time.perf_counter() - clock
    text = describe() + "\n\n" + table(rows) + "\n\nPhases (s): " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items())
    print(text)
    result = {"machine": describe(), "rows": rows, "phases_s": phases, "export": report, "dry_run": args.dry_run}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=float) + "\n")
    return result


def table(rows: list[dict]) -> str:
    def cell(v, fmt):
        return "–" if v is None else format(v, fmt)

    lines = [
        "| check | student | resolution | batch | s/step or latency | peak GB | MFU | trained params | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = f"{r['step_s']:.3f} s" if "step_s" in r else f"{r['latency_ms']:.1f} ms"
        lines.append(
            f"| {r['check']} | {r['student']} | {r['resolution']}² | {r['batch']} | {speed} | "
            f"{cell(r.get('peak_gb'), '.1f')} | {cell(r.get('mfu'), '.1%')} | "
            f"{cell(r.get('trained_params') and r['trained_params'] / 1e6, '.3g')}"
            f"{' M' if r.get('trained_params') else ''} | "
            f"{r.get('note', '')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
