"""Benchmark: LADD on the embedded default — quality vs steps against the targets, and cost.

    python benchmarks/ladd_quality.py [--metrics reports/metrics.json] [--steps 30] [--rounds 5]

Quality comes from `ladd evaluate`'s reports/metrics.json (fixed seeds and sample counts). Cost: one
LADD step and one teacher training step at the same batch size, timed side by side in this run.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from machine import describe

from ladd.data.prepare import load_split
from ladd.distill import distill
from ladd.params import load_params
from ladd.pipeline import encode_images, encode_prompts, load_pipeline, max_sequence_length
from ladd.teacher import train_transformer
from ladd.tracking import NullTracker


def teacher_step_seconds(params, steps: int, batch: int) -> float:
    pipe = load_pipeline(params.teacher.out_dir)
    train = load_split(Path(params.prepare.out_dir) / "train")
    msl = max_sequence_length(params.teacher.out_dir)
    latents = encode_images(pipe.vae, train.images)
    e, p = encode_prompts(pipe, list(train.captions["prompt"]), msl)
    ne, np_ = encode_prompts(pipe, [""], msl)
    cfg = replace(params.teacher, batch_size=batch)

    def run(n):
        start = time.perf_counter()
        train_transformer(
            copy.deepcopy(pipe.transformer), latents, e, p, ne, np_, replace(cfg, steps=n), "cpu", NullTracker()
        )
        return time.perf_counter() - start

    short, long = run(5), run(5 + steps)
    return (long - short) / steps


def ladd_step_seconds(params, steps: int) -> float:
    tmp = Path(tempfile.mkdtemp())
    # no warm-up: the timed steps draw student times as most of a run does (the warm-up draws no t = 1 rows,
    # which the heads judge)
    cfg = replace(
        params.distill,
        steps=steps + 5,
        out_dir=str(tmp / "student"),
        checkpoint=str(tmp / "ck.safetensors"),
        report_dir=str(tmp),
        checkpoint_every=10_000,
        device="cpu",
        warmup_steps=0,
    )
    summary = distill(cfg, params.teacher.out_dir, params.synthesize.out_dir, NullTracker())
    shutil.rmtree(tmp)
    return summary["sec_per_step"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--metrics", default="reports/metrics.json")
    ap.add_argument("--steps", type=int, default=30, help="timed steps for the cost ratio")
    ap.add_argument("--rounds", type=int, default=5, help="alternating LADD/teacher timing rounds")
    args = ap.parse_args()
    print(describe(), flush=True)
    torch.set_num_threads(2)
    params = load_params(args.params)
    m = json.loads(Path(args.metrics).read_text())
    t, s, naive = m["teacher"], m["student"], m["teacher_naive"]

    def pm(r, key="fd", digits=2):
        return f"{r[key]:.{digits}f}±{r[key + '_std']:.{digits}f}"

    print(
        f"\nQuality ({m['num_samples']} held-out prompts x seeds {m['seeds']}, mean ± std; FD on classifier features "
        f"vs real test set; floor {pm(m['real_floor'])})"
    )
    print(f"{'model':26s} {'NFE':>4s} {'FD':>13s} {'acc':>6s} {'prec':>6s} {'recall':>6s} {'ms/img':>7s}")
    print(
        f"{'teacher 28 steps, CFG':26s} {t['nfe']:4d} {pm(t):>13s} {t['accuracy']:6.3f} {t['precision']:6.3f} "
        f"{t['recall']:6.3f} {t['ms_per_image']:7.2f}"
    )
    for k in sorted(s, key=int):
        for name, r in ((f"teacher naive {k} steps", naive[k]), (f"student {k} steps", s[k])):
            print(
                f"{name:26s} {r['nfe']:4d} {pm(r):>13s} {r['accuracy']:6.3f} {r['precision']:6.3f} {r['recall']:6.3f} "
                f"{r['ms_per_image']:7.2f}"
            )
    print("\nTargets (ratios of means)")
    for k, bound in (("4", 0.88), ("2", 0.95), ("1", 1.00)):
        if k in s:
            ratio = s[k]["fd"] / t["fd"]
            print(
                f"student@{k} FD / teacher FD = {ratio:.3f} (target <= {bound:.2f}): "
                f"{'met' if ratio <= bound else 'MISSED'}"
            )
    ks = sorted(s, key=int)
    for lo, hi in zip(ks, ks[1:]):  # more steps never worse, within the reported spread
        worse = s[hi]["fd"] - s[lo]["fd"]
        spread = max(s[hi]["fd_std"], s[lo]["fd_std"])
        print(f"FD@{hi} - FD@{lo} = {worse:+.2f} (spread {spread:.2f}): {'met' if worse <= spread else 'MISSED'}")
    for k in ks:
        gap = (t["accuracy"] - s[k]["accuracy"]) * 100
        print(
            f"student@{k} accuracy {s[k]['accuracy']:.3f} vs teacher {t['accuracy']:.3f}: {gap:+.1f} points below "
            f"(target <= 1): {'met' if gap <= 1 else 'MISSED'}"
        )
    for k in ks:
        if k in ("1", "2"):
            r = s[k]["fd"] / naive[k]["fd"]
            print(f"student@{k} FD / naive teacher@{k} FD = {r:.2f} (target <= 0.7): {'met' if r <= 0.7 else 'MISSED'}")
    batch = params.distill.batch_size
    # alternating rounds, so drift in the machine's speed hits both sides; the median round is reported
    rounds = []
    for i in range(args.rounds):
        ladd_s, teacher_s = ladd_step_seconds(params, args.steps), teacher_step_seconds(params, args.steps, batch)
        rounds.append((ladd_s / teacher_s, ladd_s, teacher_s))
        print(
            f"round {i + 1}: LADD step {ladd_s * 1000:.0f} ms, teacher training step {teacher_s * 1000:.0f} ms, "
            f"ratio {ladd_s / teacher_s:.2f}"
        )
    ratio, ladd_s, teacher_s = sorted(rounds)[len(rounds) // 2]
    print(
        f"\nCost at batch {batch}, {torch.get_num_threads()} threads (median of {args.rounds} rounds): LADD step "
        f"{ladd_s * 1000:.0f} ms, teacher training step {teacher_s * 1000:.0f} ms, ratio {ratio:.2f} (target <= 2.5)"
    )
    print(f"full distillation ({params.distill.steps} steps) estimated at {ladd_s * params.distill.steps:.0f} s")


if __name__ == "__main__":
    main()
