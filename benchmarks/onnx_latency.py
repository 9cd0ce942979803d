"""Benchmark and tuner: the exported few-step generator (noise + text embeddings -> images) on ONNX Runtime against
PyTorch eager, same inputs, side by side in one run, for each runtime setting; the fastest setting is written into
the export's `runtime_settings.json` under this machine's key, where `ladd.onnx_runtime.OnnxStudent` (and so
`ladd generate` and the served ONNX model) reads it.

    python benchmarks/onnx_latency.py [--onnx models/onnx] [--student models/student] [--repeats 30] [--no-write]

Settings tried: intra-op threads (1 and every core), graph optimisation level, I/O binding. The one written is the
one whose slowest batch size is nearest that batch size's fastest setting (one session serves every batch).
Ratios are ORT / the faster eager PyTorch thread count at the same batch size: the target is <= 0.8 at 1 and 16.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
from pathlib import Path

import onnxruntime as ort
import torch
from machine import describe

from ladd.config import ExportConfig
from ladd.export import FewStepGenerator, median_ms
from ladd.io import atomic_file
from ladd.onnx_runtime import RUNTIME_SETTINGS, OnnxStudent, machine_key, open_session, run_session, session_feeds
from ladd.pipeline import encode_prompts, load_pipeline, read_meta
from ladd.schedules import student_sigmas

TARGET = 0.8


def write_settings(onnx_dir: Path, key: str, entry: dict) -> Path:
    path = onnx_dir / RUNTIME_SETTINGS
    held = json.loads(path.read_text()) if path.is_file() else {}
    held.setdefault("machines", {})[key] = entry
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(held, indent=2, sort_keys=True) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--onnx", default="models/onnx")
    parser.add_argument("--student", default="models/student")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--threads", type=int, nargs="+", default=None, help="thread counts to try (default: 1 and every core)"
    )
    parser.add_argument(
        "--optimizations", nargs="+", default=["basic", "extended", "all"], help="graph optimisation levels"
    )
    parser.add_argument("--no-fp16", action="store_true", help="skip the fp16 reference row")
    parser.add_argument("--no-write", action="store_true", help="measure only; leave runtime_settings.json as it is")
    args = parser.parse_args()
    print(describe(), flush=True)
    ort.set_default_logger_severity(3)
    pipe, meta = load_pipeline(args.student), read_meta(args.student)
    runtime = OnnxStudent(args.onnx, provider="cpu", threads=0, optimization="all", io_binding=False)
    steps, files = runtime.steps, runtime.manifest["models"]
    generator = FewStepGenerator(
        pipe.transformer, pipe.vae, student_sigmas(steps, meta), runtime.manifest["sampler"]
    ).eval()
    prompts = list(ExportConfig().prompts)
    cores = os.cpu_count() or 1
    thread_counts = sorted(set(args.threads or (1, cores)))
    candidates = [
        {"threads": t, "optimization": level, "io_binding": binding}
        for t, level, binding in itertools.product(thread_counts, args.optimizations, (False, True))
    ]
    torch_rows, ort_rows, fp16_rows, batches = {}, {}, {}, {}  # batch -> {threads: ms}, [ms per candidate], ms, feeds
    for batch in args.batch_sizes:
        batch_prompts = [prompts[i % len(prompts)] for i in range(batch)]
        embeds, pooled = encode_prompts(pipe, batch_prompts, int(meta.get("max_sequence_length", 256)))
        noise, step_noise = runtime.step_noise(list(range(batch)), steps)
        batches[batch] = {
            "noise": noise,
            "prompt_embeds": embeds.numpy(),
            "pooled_projections": pooled.numpy(),
            "step_noise": step_noise,
        }
        inputs = (torch.from_numpy(noise), embeds, pooled, torch.from_numpy(step_noise))
        torch_rows[batch], ort_rows[batch] = {}, []
        for threads in thread_counts:
            torch.set_num_threads(threads)

            def run_torch(inputs=inputs):
                with torch.inference_mode():
                    generator(*inputs)

            torch_rows[batch][threads] = median_ms(run_torch, args.repeats)
    for c in candidates:  # one session per setting, every batch size through it
        session = open_session(f"{args.onnx}/{files['fp32']['generator']}", "cpu", c["threads"], c["optimization"])
        for batch, feeds in batches.items():
            feed = session_feeds(session, **feeds)
            ort_rows[batch].append(
                median_ms(
                    lambda s=session, f=feed, c=c: run_session(s, ["latents", "images"], f, c["io_binding"]),
                    args.repeats,
                )
            )
    if "fp16" in files and not args.no_fp16:  # for reference: half precision has no fast CPU kernels
        session = open_session(f"{args.onnx}/{files['fp16']['generator']}", "cpu", cores, "all")
        for batch, feeds in batches.items():
            feed = session_feeds(session, **feeds)
            fp16_rows[batch] = median_ms(lambda s=session, f=feed: s.run(None, f), args.repeats)

    fastest = {b: min(ms) for b, ms in ort_rows.items()}
    eager = {b: min(t.values()) for b, t in torch_rows.items()}
    worst = [max(ort_rows[b][i] / fastest[b] for b in ort_rows) for i in range(len(candidates))]
    chosen = min(range(len(candidates)), key=worst.__getitem__)
    print(
        f"\nfew-step generator ({steps} steps + VAE decode), CPU, median of {args.repeats} runs; ratio: ORT / the "
        "faster eager thread count\n"
    )
    print("| batch | runtime | threads | ms | ORT / eager |\n|---|---|---|---|---|")
    for b in args.batch_sizes:
        for t, ms in torch_rows[b].items():
            print(f"| {b} | torch eager | {t} | {ms:.2f} | {ms / eager[b]:.2f} |")
        for i, (c, ms) in enumerate(zip(candidates, ort_rows[b])):
            mark = " **chosen**" if i == chosen else ""
            print(
                f"| {b} | ORT fp32, opt={c['optimization']}{', I/O binding' if c['io_binding'] else ''}{mark} | "
                f"{c['threads']} | {ms:.2f} | {ms / eager[b]:.2f} |"
            )
        if b in fp16_rows:
            print(f"| {b} | ORT fp16, opt=all | {cores} | {fp16_rows[b]:.2f} | {fp16_rows[b] / eager[b]:.2f} |")
    measured = {
        str(b): {"ort_ms": ort_rows[b][chosen], "eager_ms": eager[b], "ratio": ort_rows[b][chosen] / eager[b]}
        for b in args.batch_sizes
    }
    key = machine_key("cpu")
    print(f"\nchosen for {key}: {candidates[chosen]}")
    for b, m in measured.items():
        verdict = "meets" if m["ratio"] <= TARGET else "misses"
        print(
            f"batch {b}: ORT {m['ort_ms']:.2f} ms, eager {m['eager_ms']:.2f} ms, ratio {m['ratio']:.2f} ({verdict} the "
            f"target <= {TARGET})"
        )
    if not args.no_write:
        entry = {
            "settings": candidates[chosen],
            "measured": measured,
            "repeats": args.repeats,
            "export": runtime.manifest.get("source", {}).get("fingerprint"),
            "date": datetime.date.today().isoformat(),
        }
        print(f"wrote {write_settings(Path(args.onnx), key, entry)}")


if __name__ == "__main__":
    main()
