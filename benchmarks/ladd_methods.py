"""Benchmark: every distillation recipe on the embedded default, same data, seeds and budget, one table.

    python benchmarks/ladd_methods.py [--variants default,ladd,...] [--steps N] [--out reports/methods]

Each variant is `params.yaml`'s distill section with one preset of `ladd/presets.py` applied
(`default` is the section as it is). Each is trained from the same teacher and synthetic data with the
same seed and step budget, then scored by `ladd evaluate` (mean ± std over `evaluate.seeds`), against the real
test images (FD) and against the teacher's own samples (FD-T); the output ends with how closely FD-T ranks
the rows as FD does. Finished variants are kept in --out: not retrained while their settings hold, not
re-scored while the evaluation settings and code hold.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import yaml
from machine import describe

from ladd.config import DISTILL_PRESETS
from ladd.distill import distill
from ladd.evaluate import evaluate
from ladd.io import fingerprint
from ladd.params import load_params
from ladd.tracking import NullTracker

EVALUATION_CODE = [
    Path(__file__).resolve().parents[1] / "ladd" / f for f in ("evaluate.py", "quality.py", "metrics.py")
]


def train_and_score(
    params,
    name: str,
    steps: int,
    out: Path,
    overrides: dict | None = None,
    split: str = "val",
    evaluate_overrides: dict | None = None,
) -> dict:
    """Distill with preset `name` (`default`: none) plus `overrides`, then evaluate on `split` (val: choosing;
    test: reporting); cached in out/<label>: the student while its settings hold, each split's scores while the
    evaluation settings and code hold."""
    preset = name if name in DISTILL_PRESETS else None
    label = (
        name
        + "".join(f"+{k}={v}" for k, v in sorted((overrides or {}).items()))
        + (f"+steps={steps}" if steps != params.distill.steps else "")
    )
    out = out / label
    cfg = replace(
        params.distill,
        preset=preset,
        steps=steps,
        device="cpu",
        out_dir=str(out / "student"),
        checkpoint=str(out / "distill.safetensors"),
        report_dir=str(out),
    )
    if overrides:
        cfg = replace(cfg, preset=None, **{**(DISTILL_PRESETS[preset] if preset else {}), **overrides})
    settings = {
        **json.loads(json.dumps(asdict(cfg))),
        "teacher": fingerprint(params.teacher.out_dir),
        "synthetic": fingerprint(Path(params.synthesize.out_dir) / "manifest.json"),
    }
    ecfg = replace(
        params.evaluate,
        out_dir=str(out / f"reports.{split}"),
        register=False,
        device="cpu",
        split=split,
        **(evaluate_overrides or {}),
    )
    scoring = {"evaluate": json.loads(json.dumps(asdict(ecfg))), "code": fingerprint(*EVALUATION_CODE)}
    trained, result_path = out / "train.json", out / f"result.{split}.json"
    train = json.loads(trained.read_text()) if trained.is_file() else None
    if not train or train["settings"] != settings:
        shutil.rmtree(out, ignore_errors=True)
        summary = distill(cfg, params.teacher.out_dir, params.synthesize.out_dir, NullTracker())
        out.mkdir(parents=True, exist_ok=True)
        trained.write_text(json.dumps({"settings": settings, "train": summary}, indent=2, default=float) + "\n")
        train = json.loads(trained.read_text())
    cached = json.loads(result_path.read_text()) if result_path.is_file() else None
    if cached and cached["settings"] == settings and cached.get("scoring") == scoring:
        return cached
    metrics = evaluate(
        ecfg, params.prepare.out_dir, params.classifier.out_dir, params.teacher.out_dir, cfg.out_dir, NullTracker()
    )
    result = {"name": label, "settings": settings, "scoring": scoring, "train": train["train"], "metrics": metrics}
    result_path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    return result


def rank_agreement(results: list[dict]) -> str:
    """Spearman's rank correlation of fd_teacher (no real images) with fd (real test images) over every
    (recipe, step count) row, and with the naive teacher's rows added: does the teacher-referenced metric order
    the models as the real one does?"""
    from scipy.stats import spearmanr

    steps = sorted(results[0]["metrics"]["student"], key=int)
    rows = [(r["name"], k, r["metrics"]["student"][k]) for r in results for k in steps]
    naive = [("naive teacher", k, results[0]["metrics"]["teacher_naive"][k]) for k in steps]
    lines = []
    for key in ("fd_teacher", "fd_teacher_same_noise", "fd_reference", "fd_reference_same_noise"):
        if key not in rows[0][2]:
            continue
        for label, subset in (("recipes", rows), ("recipes + naive teacher", rows + naive)):
            rho, p = spearmanr([r["fd"] for *_, r in subset], [r[key] for *_, r in subset])
            lines.append(
                f"Spearman rank correlation of {key} with fd over the {len(subset)} ({label}, step count) rows: "
                f"{rho:.3f} (p = {p:.1e})"
            )
    by_fd = sorted(rows, key=lambda row: row[2]["fd"])
    by_fdt = {(n, k): i for i, (n, k, _) in enumerate(sorted(rows, key=lambda row: row[2]["fd_teacher"]))}
    moved = [
        f"{n}@{k} (rank {i + 1} by fd, {by_fdt[(n, k)] + 1} by fd_teacher)"
        for i, (n, k, _) in enumerate(by_fd)
        if abs(by_fdt[(n, k)] - i) >= 3
    ]
    lines.append("Rows whose rank moves by 3 or more: " + ("; ".join(moved) if moved else "none"))
    return "\n".join(lines)


def paired_difference(results: list[dict], name: str = "default", baseline: str = "no_adversarial") -> str:
    """`name`'s FD minus `baseline`'s at each step count, per sampling seed (the same noise for both), as the
    mean ± std of those paired differences: what the adversarial term buys where the difference beats the spread."""
    by_name = {r["name"]: r["metrics"]["student"] for r in results}
    if name not in by_name or baseline not in by_name:
        return ""
    lines = [f"{name} - {baseline}, FD per sampling seed (paired; negative: {name} better):"]
    for k in sorted(by_name[name], key=int):
        diffs = np.array(
            [a["fd"] - b["fd"] for a, b in zip(by_name[name][k]["per_seed"], by_name[baseline][k]["per_seed"])]
        )
        spread = diffs.std(ddof=1)
        verdict = "better" if diffs.mean() < -spread else "worse" if diffs.mean() > spread else "within the spread"
        lines.append(
            f"  @{k}: {diffs.mean():+.1f} ± {spread:.1f} ({verdict}; per seed {', '.join(f'{d:+.1f}' for d in diffs)})"
        )
    return "\n".join(lines)


def fmt(row: dict, key: str, digits: int = 1) -> str:
    return f"{row[key]:.{digits}f}±{row[key + '_std']:.{digits}f}"


def health(h: dict) -> str:
    """GAN health in a cell: the verdict and the heads' loss below chance (in %)."""
    return h["status"] if h["status"] == "off" else f"{h['status']} ({h['gain_over_chance'] * 100:.0f}%)"


def table(results: list[dict]) -> str:
    first = results[0]["metrics"]
    teacher, naive, floor, reference = (
        first["teacher"],
        first["teacher_naive"],
        first["real_floor"],
        first.get("reference"),
    )
    steps = sorted(first["student"], key=int)
    ref = (
        (
            f"reference teacher (CFG {reference['guidance']:g}): FD {fmt(reference, 'fd')}, its own floor FD-ref "
            f"{fmt(reference, 'fd_reference')}; "
        )
        if reference
        else ""
    )
    lines = [
        f"{first['num_samples']} prompts of the {first.get('split', 'test')} split x {len(first['seeds'])} seeds; "
        "mean ± std "
        f"over seeds. Real-vs-real floor FD {fmt(floor, 'fd')}; {ref}"
        f"teacher distilled from ({teacher['steps']} steps, CFG {teacher['guidance']:g}): FD {fmt(teacher, 'fd')}, "
        f"its own floor FD-T {fmt(teacher, 'fd_teacher')}, accuracy {teacher['accuracy']:.3f}; naive teacher FD "
        + ", ".join(f"@{k} {naive[k]['fd']:.1f}" for k in steps),
        "",
    ]
    extra = [f"FD-ref@{steps[-1]}"] if reference else []
    head = [
        "variant",
        *[f"FD@{k}" for k in steps],
        *[f"FD-T@{k}" for k in steps],
        *extra,
        *[f"acc@{k}" for k in steps],
        f"prec@{steps[-1]}",
        f"rec@{steps[-1]}",
        "s/step",
        *[f"FD@{k}/T" for k in steps],
        *[f"FD@{k}/naive" for k in steps[:-1]],
        "heads",
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        s, last = r["metrics"]["student"], r["metrics"]["student"][steps[-1]]
        cells = [
            r["name"],
            *[fmt(s[k], "fd") for k in steps],
            *[fmt(s[k], "fd_teacher") for k in steps],
            *([fmt(last, "fd_reference")] if reference else []),
            *[f"{s[k]['accuracy']:.3f}" for k in steps],
            f"{last['precision']:.3f}",
            f"{last['recall']:.3f}",
            f"{r['train']['sec_per_step']:.3f}",
            *[f"{s[k]['fd'] / teacher['fd']:.2f}" for k in steps],
            *[f"{s[k]['fd'] / naive[k]['fd']:.2f}" for k in steps[:-1]],
            health(r["train"]["gan_health"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "FD-T@k (the field's FID-T): FD of the student's k-step samples to the samples of the teacher it was "
        "distilled from, same prompts, another seed (no real images); FD-ref: the same against the reference "
        "teacher; FD@k/T: student FD at k steps over that teacher's; FD@k/naive: over the naive teacher at k "
        "steps; heads: GAN health of the discriminator over the last quarter (its loss below chance, in %).",
    ]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--variants", default=",".join(["default", *DISTILL_PRESETS]))
    ap.add_argument("--steps", type=int, default=None, help="distillation steps per variant (default: distill.steps)")
    ap.add_argument("--out", default="reports/methods")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--split",
        choices=("val", "test"),
        default="val",
        help="held-out split scored: val (choosing settings) or test (reporting the chosen ones, once)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a distill setting (YAML value) over every variant's, e.g. --set ema_decay=0.995; repeatable",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    out = Path(args.out)
    overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)} or None
    results = []
    for name in args.variants.split(","):
        print(f"== {name}", flush=True)
        results.append(train_and_score(params, name, args.steps or params.distill.steps, out, overrides, args.split))
    text = describe() + "\n\n" + table(results) + "\n\n" + paired_difference(results) + "\n\n" + rank_agreement(results)
    (out / f"table.{args.split}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
