"""Benchmark: the exported few-step generator (noise + text embeddings -> images) on ONNX Runtime against
PyTorch eager, same inputs, side by side in one run, for each runtime setting tried.

    python benchmarks/onnx_latency.py [--onnx models/onnx] [--student models/student] [--repeats 30]

Settings: graph optimisation level, intra-op threads, I/O binding (inputs bound once as OrtValues,
outputs left to ORT), and the fp16 graph. Ratios are ORT / torch at the same thread count.
"""

from __future__ import annotations

import argparse
import json

import onnxruntime as ort
import torch

from ladd.config import ExportConfig
from ladd.schedules import student_sigmas
from ladd.export import FewStepGenerator, median_ms
from ladd.onnx_runtime import OnnxStudent, open_session, session_feeds
from ladd.pipeline import encode_prompts, load_pipeline, read_meta
from machine import describe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--onnx", default="models/onnx")
    parser.add_argument("--student", default="models/student")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(describe(), flush=True)
    ort.set_default_logger_severity(3)
    pipe, meta = load_pipeline(args.student), read_meta(args.student)
    runtime = OnnxStudent(args.onnx, provider="cpu")
    steps, files = runtime.steps, runtime.manifest["models"]
    generator = FewStepGenerator(pipe.transformer, pipe.vae, student_sigmas(steps, meta), runtime.manifest["sampler"]).eval()
    prompts = list(ExportConfig().prompts)
    rows = []
    for batch in args.batch_sizes:
        batch_prompts = [prompts[i % len(prompts)] for i in range(batch)]
        embeds, pooled = encode_prompts(pipe, batch_prompts, int(meta.get("max_sequence_length", 256)))
        noise, step_noise = runtime.step_noise(list(range(batch)), steps)
        feeds = {"noise": noise, "prompt_embeds": embeds.numpy(), "pooled_projections": pooled.numpy(), "step_noise": step_noise}
        inputs = (torch.from_numpy(noise), embeds, pooled, torch.from_numpy(step_noise))
        for threads in (1, 2):
            torch.set_num_threads(threads)

            def run_torch():
                with torch.inference_mode():
                    generator(*inputs)

            torch_ms = median_ms(run_torch, args.repeats)
            rows.append({"batch": batch, "threads": threads, "runtime": "torch eager", "ms": torch_ms, "ratio": 1.0})
            for precision, level, binding in [("fp32", "disable", False), ("fp32", "basic", False),
                                              ("fp32", "extended", False), ("fp32", "all", False),
                                              ("fp32", "all", True), ("fp16", "all", False)]:
                session = open_session(f"{args.onnx}/{files[precision]['generator']}", "cpu", threads, level)
                feed = session_feeds(session, **feeds)
                if binding:
                    io = session.io_binding()
                    for name, value in feed.items():
                        io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value))
                    for out in session.get_outputs():
                        io.bind_output(out.name)
                    run = lambda: session.run_with_iobinding(io)  # noqa: E731
                else:
                    run = lambda: session.run(None, feed)  # noqa: E731
                ms = median_ms(run, args.repeats)
                name = f"ORT {precision}, opt={level}" + (", I/O binding" if binding else "")
                rows.append({"batch": batch, "threads": threads, "runtime": name, "ms": ms, "ratio": ms / torch_ms})
    print(f"\nfew-step generator ({steps} steps + VAE decode), CPU, median of {args.repeats} runs\n")
    print("| batch | threads | runtime | ms | ORT / torch |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['threads']} | {r['runtime']} | {r['ms']:.2f} | {r['ratio']:.2f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
