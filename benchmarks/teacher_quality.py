"""Benchmark: the embedded-default teacher's pretraining time and sample quality.

    python benchmarks/teacher_quality.py [--train] [--teacher models/teacher]

--train pretrains a fresh teacher with params.yaml's `teacher` section (timed). Then: classifier
accuracy and FD of 28-step samples at each CFG of --guidance for every prompt of --split (val, where the
CFG of evaluate.reference_guidance is chosen; test to report), next to the real-vs-real floor and the
teacher sampled naively at 1, 2 and 4 steps. Each figure is the mean ± std over --seeds; prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import describe

from ladd.classifier import load_classifier
from ladd.data.prepare import load_split
from ladd.generate import generate_latents, record_noise
from ladd.params import load_params
from ladd.pipeline import decode_latents, encode_prompts, latent_shape, load_pipeline, max_sequence_length
from ladd.quality import real_features, real_floor, score_images
from ladd.sampling import flow_sigmas
from ladd.teacher import teacher_stage
from ladd.tracking import NullTracker


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--teacher", default=None, help="teacher folder (default: params' teacher.out_dir)")
    ap.add_argument("--train", action="store_true", help="pretrain a fresh teacher first and time it")
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    ap.add_argument("--naive-guidance", type=float, default=2.0, help="CFG of the naive few-step rows")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1234, 1235, 1236])
    ap.add_argument("--split", choices=("val", "test"), default="val")
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
    train, test = load_split(data / "train"), load_split(data / args.split)
    classifier = load_classifier(params.classifier.out_dir)
    real = real_features(classifier, test)
    n = len(test.captions)
    floors = [real_floor(classifier, train, test, n, seed) for seed in args.seeds]
    rows.append(("real train vs split (floor)", "-", "-", floors, 0.0))
    pipe = load_pipeline(teacher_dir)
    msl = max_sequence_length(teacher_dir)
    prompts = list(test.captions["prompt"])
    embeds, pooled = encode_prompts(pipe, prompts, msl)
    null_e, null_p = encode_prompts(pipe, [""], msl)
    runs = [(28, g) for g in args.guidance] + [(k, args.naive_guidance) for k in (1, 2, 4)]
    for steps, g in runs:
        per_seed, start = [], time.perf_counter()
        for seed in args.seeds:  # evaluate's noise: record i of seed s from s * 1_000_003 + i
            noise = record_noise([seed * 1_000_003 + i for i in range(n)], latent_shape(pipe))
            lat = generate_latents(
                pipe.transformer,
                embeds,
                pooled,
                noise,
                flow_sigmas(steps, pipe.scheduler.config.shift),
                g,
                null_e,
                null_p,
            )
            per_seed.append(score_images(classifier, decode_latents(pipe.vae, lat), test.labels, real))
        ms = (time.perf_counter() - start) * 1000 / (n * len(args.seeds))
        rows.append((f"teacher {steps} steps", steps, g, per_seed, ms))
    print(
        f"\n{n} {args.split} prompts, seeds {args.seeds}: mean ± std over seeds; FD on the classifier's penultimate "
        f"features vs the real {args.split} images"
    )
    print(f"{'model':28s} {'steps':>5s} {'cfg':>5s} {'FD':>13s} {'acc':>6s} {'prec':>6s} {'recall':>6s} {'ms/img':>7s}")
    for name, steps, g, per_seed, ms in rows:
        m = {k: np.array([r[k] for r in per_seed if k in r]) for k in ("fd", "accuracy", "precision", "recall")}
        cell = {k: f"{v.mean():6.3f}" if len(v) else "     -" for k, v in m.items()}
        print(
            f"{name:28s} {steps!s:>5s} {g!s:>5s} {m['fd'].mean():6.1f} ± {m['fd'].std(ddof=1):4.1f} {cell['accuracy']} "
            f"{cell['precision']} {cell['recall']} {ms:7.2f}"
        )


if __name__ == "__main__":
    main()
