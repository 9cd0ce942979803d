"""Benchmark: does the preference stage (`ladd align`) pay on the embedded default, and what does it cost?

    python benchmarks/align_quality.py [--seeds 0,1,2] [--set lora_rank=16 --set beta=1000 ...] [--out DIR]

One run, side by side on this machine: `distill` with params.yaml's settings (timed: the stage the cost is
measured against), then for each align seed `align` with params.yaml's align section (enabled, plus --set) on
that student (timed) and `evaluate` of student and aligned student (params.yaml's evaluate: held-out prompts,
evaluate.seeds). Rows per step count: the student (before) and the aligned student (after, each align seed and
their mean): reward, accuracy, FD, each the mean ± std over the sampling seeds. Targets: the 4-step reward up by
more than the spread, accuracy at 1 and 4 steps >= the student's + 0.5 point, FD not worse by more than the
spread, align's time <= 1/4 of distill's.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml
from machine import describe

from ladd.align import align_stage
from ladd.distill import distill
from ladd.evaluate import evaluate
from ladd.params import load_params
from ladd.tracking import NullTracker

FIGURES = ("reward", "accuracy", "fd")


def cell(row: dict, key: str) -> str:
    scale = 100 if key == "accuracy" else 1  # accuracy in points
    digits = 2 if key == "fd" else 3 if key == "reward" else 2
    return f"{row[key] * scale:.{digits}f} ± {row[key + '_std'] * scale:.{digits}f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--seeds", default="0,1,2", help="align seeds (candidates' noise and the DPO batches)")
    ap.add_argument("--set", action="append", default=[], help="align.KEY=VALUE over params.yaml's align section")
    ap.add_argument("--out", default="reports/align_bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--split",
        choices=("val", "test"),
        default="val",
        help="val to choose align's settings, test to report the chosen ones (once)",
    )
    ap.add_argument("--student", default=None, help="an existing student instead of distilling one (no time ratio)")
    ap.add_argument("--quick", action="store_true", help="exploring: a 1-step teacher row (unused here), steps 1 and 4")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    out = Path(args.out)
    student, distill_s = Path(args.student or out / "student"), float("nan")
    if not args.student:
        start = time.perf_counter()
        distill(
            replace(
                params.distill,
                out_dir=str(student),
                checkpoint=str(out / "distill.safetensors"),
                report_dir=str(out),
                device="cpu",
            ),
            params.teacher.out_dir,
            params.synthesize.out_dir,
            NullTracker(),
        )
        distill_s = time.perf_counter() - start
        (out / "distill.safetensors").unlink(missing_ok=True)  # no resume of this run by the next
    quick = dict(teacher_steps=1, reference_guidance=None, few_steps=(1, 4)) if args.quick else {}
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        cfg = replace(
            params.align, enabled=True, seed=seed, out_dir=str(out / f"aligned_{seed}"), device="cpu", **overrides
        )
        start = time.perf_counter()
        summary = align_stage(
            cfg, params.prepare.out_dir, params.classifier.out_dir, student, out / f"validation_{seed}", NullTracker()
        )
        align_s = time.perf_counter() - start
        ecfg = replace(
            params.evaluate,
            out_dir=str(out / f"reports_{seed}"),
            register=False,
            device="cpu",
            split=args.split,
            **quick,
        )
        evaluate(
            ecfg, params.prepare.out_dir, params.classifier.out_dir, params.teacher.out_dir, student, NullTracker(), cfg
        )
        report = json.loads((out / f"reports_{seed}" / "align.json").read_text())
        runs.append({"seed": seed, "seconds": align_s, "summary": summary, "report": report})
    steps = list(runs[0]["report"]["before"])
    before = runs[0]["report"]["before"]  # the same student, prompts and sampling seeds in every run
    lines = [
        f"# Preference stage on the embedded default ({describe()})",
        "",
        "align settings: "
        + json.dumps(
            {
                k: v
                for k, v in vars(replace(params.align, **overrides)).items()
                if k not in ("enabled", "out_dir", "device")
            },
            default=list,
        ),
        f"{runs[0]['report']['num_samples']} held-out prompts; each cell: mean ± std over sampling seeds "
        f"{runs[0]['report']['seeds']}; accuracy in points",
        "",
        "| model | steps | " + " | ".join(FIGURES) + " |",
        "|---|---|" + "---|" * len(FIGURES),
    ]
    for k in steps:
        lines.append(f"| student | {k} | " + " | ".join(cell(before[k], f) for f in FIGURES) + " |")
        for r in runs:
            lines.append(
                f"| aligned, seed {r['seed']} | {k} | "
                + " | ".join(cell(r["report"]["after"][k], f) for f in FIGURES)
                + " |"
            )
    lines += [
        "",
        "| steps | Δ reward (mean of align seeds) | Δ accuracy, points | Δ FD | spread (std over seeds: reward / FD) |",
        "|---|---|---|---|---|",
    ]
    verdict = {}
    for k in steps:
        after = {f: np.array([r["report"]["after"][k][f] for r in runs]) for f in FIGURES}
        spread = {
            f: max(
                before[k][f + "_std"],
                *[r["report"]["after"][k][f + "_std"] for r in runs],
                after[f].std(ddof=1) if len(runs) > 1 else 0.0,
            )
            for f in FIGURES
        }
        delta = {f: after[f].mean() - before[k][f] for f in FIGURES}
        verdict[k] = delta, spread
        lines.append(
            f"| {k} | {delta['reward']:+.4f} | {delta['accuracy'] * 100:+.2f} | {delta['fd']:+.2f} | "
            f"{spread['reward']:.4f} / {spread['fd']:.2f} |"
        )
    align_s = float(np.mean([r["seconds"] for r in runs]))
    lines += [
        "",
        f"time: distill {distill_s:.1f} s, align {align_s:.1f} s (mean of {len(runs)}; "
        f"{np.mean([r['summary']['pairs'] for r in runs]):.0f} pairs) = {align_s / distill_s:.3f} of distill",
        "",
    ]
    checks = []
    if "4" in verdict:
        d, s = verdict["4"]
        checks.append(("4-step reward up by more than the spread", d["reward"] > s["reward"]))
    for k in ("1", "4"):
        if k in verdict:
            d, s = verdict[k]
            checks.append((f"accuracy at {k} step(s) >= student + 0.5 point", d["accuracy"] >= 0.005))
            checks.append((f"FD at {k} step(s) not worse by more than the spread", d["fd"] <= s["fd"]))
    checks.append(("align <= 1/4 of distill's time", align_s <= distill_s / 4))
    lines += [f"- {'met' if ok else 'NOT met'}: {name}" for name, ok in checks]
    text = "\n".join(lines)
    print(text)
    (out / "align_quality.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
