"""Benchmark: the embedded-default teacher's pretraining time and sample quality.

    python benchmarks/teacher_quality.py [--train] [--teacher models/teacher]

--train pretrains a fresh teacher with params.yaml's `teacher` section (timed). Then: classifier
accuracy and FD of 28-step CFG samples for every test prompt, next to the real-vs-real floor and the
teacher sampled naively at 1, 2 and 4 steps. Fixed seeds and sample counts; prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from ladd.classifier import load_classifier
from ladd.params import load_params
from ladd.data.prepare import load_split
from ladd.generate import generate_latents, record_noise
from ladd.pipeline import decode_latents, encode_prompts, latent_shape, load_pipeline, max_sequence_length
from ladd.quality import real_features, real_floor, score_images
from ladd.sampling import flow_sigmas
from ladd.teacher import teacher_stage
from ladd.tracking import NullTracker
from machine import describe


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--teacher", default=None, help="teacher folder (default: params' teacher.out_dir)")
    ap.add_argument("--train", action="store_true", help="pretrain a fresh teacher first and time it")
    ap.add_argument("--guidance", type=float, nargs="+", default=[2.0, 3.0, 5.0])
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(describe(), flush=True)
    params = load_params(args.params)
    data = Path(params.prepare.out_dir)
    rows = []
    teacher_dir = Path(args.teacher or params.teacher.out_dir)
    if args.train:
        teacher_dir = Path(tempfile.mkdtemp()) / "teacher"
        cfg = dataclasses.replace(params.teacher, out_dir=str(teacher_dir))
        start = time.perf_counter()
        teacher_stage(cfg, data, cfg.device, NullTracker())
        print(f"teacher pretraining wall time: {time.perf_counter() - start:.1f} s ({torch.get_num_threads()} threads)")
    train, test = load_split(data / "train"), load_split(data / "test")
    classifier = load_classifier(params.classifier.out_dir)
    real = real_features(classifier, test)
    n = len(test.captions)
    rows.append(("real train vs test (floor)", "-", "-", real_floor(classifier, train, test, n), 0.0))
    pipe = load_pipeline(teacher_dir)
    msl = max_sequence_length(teacher_dir)
    prompts = list(test.captions["prompt"])
    embeds, pooled = encode_prompts(pipe, prompts, msl)
    null_e, null_p = encode_prompts(pipe, [""], msl)
    noise = record_noise([args.seed + i for i in range(n)], latent_shape(pipe))
    runs = [(28, g) for g in args.guidance] + [(k, args.guidance[len(args.guidance) // 2]) for k in (1, 2, 4)]
    for steps, g in runs:
        start = time.perf_counter()
        lat = generate_latents(pipe.transformer, embeds, pooled, noise, flow_sigmas(steps, pipe.scheduler.config.shift),
                               g, null_e, null_p)
        ms = (time.perf_counter() - start) * 1000 / n
        rows.append((f"teacher {steps} steps", steps, g, score_images(classifier, decode_latents(pipe.vae, lat), test.labels, real), ms))
    print(f"\n{n} test prompts, seed {args.seed}, FD on classifier penultimate features vs real test set")
    print(f"{'model':32s} {'steps':>5s} {'cfg':>5s} {'FD':>8s} {'acc':>6s} {'prec':>6s} {'recall':>6s} {'ms/img':>7s}")
    for name, steps, g, m, ms in rows:
        print(f"{name:32s} {steps!s:>5s} {g!s:>5s} {m['fd']:8.2f} {m['accuracy']:6.3f} {m['precision']:6.3f} {m['recall']:6.3f} {ms:7.2f}")


if __name__ == "__main__":
    main()
