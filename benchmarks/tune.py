"""Benchmark: choose a recipe's settings on the val split, then report the chosen ones on test, once.

    python benchmarks/tune.py --base ladd --out reports/tuning/ladd [--space ladd] [--report]

Coordinate search from `--base` (a preset of ladd/presets.py, or `default`: params.yaml's distill section):
each setting of the space in turn takes each of its values with the others at the best found so far, and
a value replaces the best when it lowers the objective on `val`, the worse of FD@1 / (1.05 x teacher) and
FD@4 / (1.10 x teacher) (the targets: at most 1.05x and 1.10x the teacher's FD), by more than the spread of
its paired per-seed differences (every setting samples the same noise): a smaller difference is no result.
Every student and score is cached by its settings (benchmarks/ladd_methods.py), so a rerun only does what is
missing. `--report` scores the chosen settings on test, beside any `--arm NAME:KEY=VALUE,...` (the chosen
settings with those changed), and prints the test table: figures chosen on val, reported on test.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml
from ladd_methods import fmt, health, train_and_score
from machine import describe

from ladd.params import load_params

SPACES = {  # the values each setting takes, tried in this order
    # the paper's recipe: every knob the default's own selection had, and the discriminator's
    # (d_steps_per_g 5: NVlabs/FastGen's LADD updates the student every 5th step; steps 1000: twice the budget)
    "ladd": {
        "lr_d": [1e-4, 3e-4, 1e-3],
        "lr_g": [1e-5, 3e-5, 1e-4],
        "renoise_mean": [1.0, 0.5, 0.0, -0.5],
        "renoise_std": [1.0, 0.5],
        "head_channels": [64, 128],
        "feature_layers": [None, [-2, -1], [0, 1]],
        "ema_decay": [0.99, 0.996, 0.999],
        "d_steps_per_g": [1, 5],
        "steps": [500, 1000],
    },
    # the default's own knobs, chosen again on val
    "default": {"lr_g": [1e-5, 3e-5, 1e-4], "ema_decay": [0.995, 0.996, 0.997], "renoise_mean": [-0.25, 0.5, 1.0]},
}
SWEEP_EVALUATION = {"reference_guidance": None}  # choosing needs FD and FID-T only: no reference row


def objective(result: dict) -> float:
    s, teacher = result["metrics"]["student"], result["metrics"]["teacher"]["fd"]
    return max(s["1"]["fd"] / (1.05 * teacher), s["4"]["fd"] / (1.10 * teacher))


def seed_objectives(result: dict) -> np.ndarray:
    """The objective seed by seed (each sampling seed's student and teacher FD): paired across settings, since
    every setting is sampled from the same noise."""
    m = result["metrics"]
    one, four, teacher = (m["student"]["1"]["per_seed"], m["student"]["4"]["per_seed"], m["teacher"]["per_seed"])
    return np.array(
        [max(a["fd"] / (1.05 * t["fd"]), b["fd"] / (1.10 * t["fd"])) for a, b, t in zip(one, four, teacher)]
    )


def better(candidate: dict, best: dict) -> bool:
    """A setting replaces the best only where it improves the objective by more than the spread of the paired
    per-seed differences: a difference smaller than the spread is no result."""
    diff = seed_objectives(candidate) - seed_objectives(best)
    return diff.mean() < -diff.std(ddof=1)


def run(params, base: str, overrides: dict, out: Path, split: str, evaluate_overrides=None) -> dict:
    start = replace(params.distill, preset=None if base == "default" else base)
    # over the preset's (train_and_score applies it); a value the base has already names the same student
    overrides = {k: v for k, v in overrides.items() if json.dumps(v) != json.dumps(getattr(start, k))}
    settings = dict(overrides)
    steps = settings.pop("steps", params.distill.steps)
    name = base if not overrides else base + "".join(f"+{k}={v}" for k, v in sorted(overrides.items()))
    result = train_and_score(params, base, steps, out, settings or None, split, evaluate_overrides)
    return {**result, "name": name, "overrides": overrides}


def search(params, base: str, space: dict, out: Path) -> tuple[dict, list[dict]]:
    tried = {}

    def result(overrides):
        key = json.dumps(overrides, sort_keys=True)
        if key not in tried:
            print(f"== {base} {overrides or '(as it is)'} on val", flush=True)
            tried[key] = run(params, base, overrides, out, "val", SWEEP_EVALUATION)
            print(f"   objective {objective(tried[key]):.3f}", flush=True)
        return tried[key]

    start = replace(params.distill, preset=None if base == "default" else base)  # the base's own settings

    def same(a, b):  # lists and tuples alike (feature_layers)
        return json.dumps(a) == json.dumps(b)

    best = {}
    for key, values in space.items():
        for value in values:
            if same(value, best.get(key, getattr(start, key))):
                continue  # the best so far already has it
            candidate = {**best, key: value}
            if better(result(candidate), result(best)):
                best = candidate
    return best, list(tried.values())


def rows(results: list[dict], steps=("1", "2", "4")) -> str:
    head = [
        "settings",
        *[f"FD@{k}" for k in steps],
        *[f"FID-T@{k}" for k in steps],
        f"acc@{steps[-1]}",
        "objective",
        "heads",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        s = r["metrics"]["student"]
        lines.append(
            "| "
            + " | ".join(
                [
                    r["name"],
                    *[fmt(s[k], "fd") for k in steps],
                    *[fmt(s[k], "fd_teacher") for k in steps],
                    f"{s[steps[-1]]['accuracy']:.3f}",
                    f"{objective(r):.3f}",
                    health(r["train"]["gan_health"]),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--base", default="ladd", help="a preset of ladd/presets.py, or default (params.yaml's distill)")
    ap.add_argument("--space", default=None, help=f"one of {list(SPACES)} (default: --base's, else ladd's)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--report", action="store_true", help="then score the chosen settings on test")
    ap.add_argument(
        "--arm",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="with --report: the chosen settings with these changed, also on test (YAML values)",
    )
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    out = Path(args.out or f"reports/tuning/{args.base}")
    space = SPACES[args.space or (args.base if args.base in SPACES else "ladd")]
    best, tried = search(params, args.base, space, out)
    teacher = tried[0]["metrics"]["teacher"]
    text = [
        describe(),
        "",
        f"{args.base}: {len(tried)} settings on val ({tried[0]['metrics']['num_samples']} prompts x "
        f"{len(tried[0]['metrics']['seeds'])} seeds; teacher FD {fmt(teacher, 'fd')}); chosen: {best or '(as it is)'}",
        "",
        rows(sorted(tried, key=objective)),
    ]
    if args.report:
        reported = [{**run(params, args.base, best, out, "test"), "name": f"chosen: {best or args.base}"}]
        for arm in args.arm:
            label, _, changes = arm.partition(":")
            change = {k: yaml.safe_load(v) for k, v in (c.split("=", 1) for c in changes.split(";"))}
            reported.append({**run(params, args.base, {**best, **change}, out, "test"), "name": label})
        t = reported[0]["metrics"]["teacher"]
        ref = reported[0]["metrics"].get("reference")
        text += [
            "",
            f"on test ({reported[0]['metrics']['num_samples']} prompts x {len(reported[0]['metrics']['seeds'])} "
            f"seeds): teacher FD {fmt(t, 'fd')}"
            + (f", reference teacher (CFG {ref['guidance']:g}) FD {fmt(ref, 'fd')}" if ref else ""),
            "",
            rows(reported),
        ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text("\n".join(text) + "\n")
    (out / "chosen.json").write_text(json.dumps({"base": args.base, "chosen": best}, indent=2) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
