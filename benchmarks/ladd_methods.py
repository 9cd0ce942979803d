"""Benchmark: every distillation recipe on the embedded default, same data, seeds and budget, one table.

    python benchmarks/ladd_methods.py [--variants default,ladd,...] [--steps N] [--out reports/methods]

Each variant is `params.yaml`'s distill section with one preset of `ladd/presets.py` applied
(`default` is the section as it is). Each is trained from the same teacher and synthetic data with the
same seed and step budget, then scored by `ladd evaluate` (mean ± std over `evaluate.seeds`). Finished
variants are kept in --out and not retrained when their settings are unchanged.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ladd.config import DISTILL_PRESETS, load_params
from ladd.distill import distill
from ladd.evaluate import evaluate
from ladd.tracking import NullTracker


def train_and_score(params, name: str, steps: int, out: Path, overrides: dict | None = None) -> dict:
    """Distill with preset `name` (`default`: none) plus `overrides`, then evaluate; cached in out/<label>."""
    preset = name if name in DISTILL_PRESETS else None
    label = name + "".join(f"+{k}={v}" for k, v in (overrides or {}).items())
    out = out / label
    cfg = replace(params.distill, preset=preset, steps=steps, device="cpu", out_dir=str(out / "student"),
                  checkpoint=str(out / "distill.safetensors"))
    if overrides:
        cfg = replace(cfg, preset=None, **{**(DISTILL_PRESETS[preset] if preset else {}), **overrides})
    settings = json.loads(json.dumps(asdict(cfg)))
    result_path = out / "result.json"
    cached = json.loads(result_path.read_text()) if result_path.is_file() else None
    if cached and cached["settings"] == settings:
        return cached
    shutil.rmtree(out, ignore_errors=True)
    summary = distill(cfg, params.teacher.out_dir, params.synthesize.out_dir, NullTracker())
    metrics = evaluate(replace(params.evaluate, out_dir=str(out / "reports"), register=False, device="cpu"),
                       params.prepare.out_dir, params.classifier.out_dir, params.teacher.out_dir, cfg.out_dir, NullTracker())
    result = {"name": label, "settings": settings, "train": summary, "metrics": metrics}
    result_path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    return result


def fmt(row: dict, key: str, digits: int = 1) -> str:
    return f"{row[key]:.{digits}f}±{row[key + '_std']:.{digits}f}"


def table(results: list[dict]) -> str:
    first = results[0]["metrics"]
    teacher, naive, floor = first["teacher"], first["teacher_naive"], first["real_floor"]
    steps = sorted(first["student"], key=int)
    lines = [f"{first['num_samples']} held-out prompts x {len(first['seeds'])} seeds; mean ± std over seeds. "
             f"Real-vs-real floor FD {fmt(floor, 'fd')}; teacher {teacher['steps']} steps CFG {teacher['guidance']:g}: "
             f"FD {fmt(teacher, 'fd')}, accuracy {teacher['accuracy']:.3f}; naive teacher FD "
             + ", ".join(f"@{k} {naive[k]['fd']:.1f}" for k in steps), ""]
    head = ["variant", *[f"FD@{k}" for k in steps], *[f"acc@{k}" for k in steps], f"prec@{steps[-1]}",
            f"rec@{steps[-1]}", "s/step", *[f"FD@{k}/T" for k in steps], *[f"FD@{k}/naive" for k in steps[:-1]], "heads"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        s, last = r["metrics"]["student"], r["metrics"]["student"][steps[-1]]
        cells = [r["name"], *[fmt(s[k], "fd") for k in steps], *[f"{s[k]['accuracy']:.3f}" for k in steps],
                 f"{last['precision']:.3f}", f"{last['recall']:.3f}", f"{r['train']['sec_per_step']:.3f}",
                 *[f"{s[k]['fd'] / teacher['fd']:.2f}" for k in steps],
                 *[f"{s[k]['fd'] / naive[k]['fd']:.2f}" for k in steps[:-1]],
                 f"{r['train']['gan_health']['status']} ({r['train']['gan_health']['gain_over_chance'] * 100:.0f}%)"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "FD@k/T: student FD at k steps over the teacher's (targets: @1 <= 1.15, @2 <= 1.10, @4 <= 1.00); "
              "FD@k/naive: over the naive teacher at k steps (target <= 0.7); heads: GAN health of the discriminator "
              "over the last quarter (its loss below chance, in %)."]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--variants", default=",".join(["default", *DISTILL_PRESETS]))
    ap.add_argument("--steps", type=int, default=None, help="distillation steps per variant (default: distill.steps)")
    ap.add_argument("--out", default="reports/methods")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    out = Path(args.out)
    results = []
    for name in args.variants.split(","):
        print(f"== {name}", flush=True)
        results.append(train_and_score(params, name, args.steps or params.distill.steps, out))
    text = table(results)
    (out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
