"""Benchmark: the embedded default distilled on 1 process and on N CPU processes (torchrun, gloo), then scored
by `ladd evaluate` (mean ± std over `evaluate.seeds`), both rows side by side in one run.

    python benchmarks/distributed.py [--nproc 2] [--parallel ddp,fsdp] [--out reports/distributed]

Needs the outputs of `make run` (prepared data, teacher, classifier, synthetic data). Each row runs
`ladd distill` and `ladd evaluate` as a user would, with params.yaml's settings, its own out_dir and
checkpoint, tracking off.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from machine import describe

ROOT = Path(__file__).resolve().parents[1]


def run_row(nproc: int, parallel: str, out: Path) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["distill"].update(
        out_dir=str(out / "student"),
        checkpoint=str(out / "distill.safetensors"),
        report_dir=str(out),
        parallel=parallel if nproc > 1 else "none",
    )
    params["evaluate"].update(out_dir=str(out / "reports"), register=False)
    params["launch"].update(nproc_per_node=nproc, stages=["distill"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "LADD_TRACKING": "0"}
    seconds = {}
    for stage in ("distill", "evaluate"):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "ladd.cli", stage, "--params", str(out / "params.yaml")],
            cwd=ROOT,
            env=env,
            check=True,
        )
        seconds[stage] = time.perf_counter() - start
    summary = json.loads((out / "student" / "ladd_train_summary.json").read_text())
    summary |= json.loads((out / "distill.json").read_text())  # timings, processes: distill.report_dir
    metrics = json.loads((out / "reports" / "metrics.json").read_text())
    return {
        "processes": summary["world_size"],
        "parallel": summary["parallel"],
        "sec_per_step": summary["sec_per_step"],
        "distill_s": seconds["distill"],
        "health": summary["gan_health"]["status"],
        "student": metrics["student"],
        "teacher": metrics["teacher"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--parallel", default="ddp,fsdp", help="strategies, one row each (comma-separated)")
    ap.add_argument("--out", default="reports/distributed")
    args = ap.parse_args()
    print(describe(), flush=True)
    rows = [run_row(1, "none", Path(args.out) / "one")]
    rows += [run_row(args.nproc, parallel, Path(args.out) / parallel) for parallel in args.parallel.split(",")]
    steps = sorted(rows[0]["student"], key=int)
    print(f"\nteacher: FD {rows[0]['teacher']['fd']:.1f} ± {rows[0]['teacher']['fd_std']:.1f}\n")
    print(
        "| processes | parallel | "
        + " | ".join(f"FD@{k}" for k in steps)
        + " | "
        + " | ".join(f"acc@{k}" for k in steps)
        + " | heads | s/step (per process) | distill wall |"
    )
    print("|---" * (4 + 2 * len(steps)) + "|---|")
    for r in rows:
        fd = " | ".join(f"{r['student'][k]['fd']:.1f} ± {r['student'][k]['fd_std']:.1f}" for k in steps)
        acc = " | ".join(f"{r['student'][k]['accuracy']:.3f}" for k in steps)
        print(
            f"| {r['processes']} | {r['parallel']} | {fd} | {acc} | {r['health']} | {r['sec_per_step']:.3f} | "
            f"{r['distill_s'] / 60:.1f} min |"
        )
    print()
    for row in rows[1:]:
        gaps = [abs(row["student"][k]["fd"] - rows[0]["student"][k]["fd"]) for k in steps]
        spreads = [max(rows[0]["student"][k]["fd_std"], row["student"][k]["fd_std"]) for k in steps]
        verdict = "within" if all(g <= s for g, s in zip(gaps, spreads)) else "NOT within"
        print(
            f"{row['parallel']}: FD gap to 1 process {', '.join(f'{g:.2f}' for g in gaps)} at "
            f"{', '.join(steps)} steps, spread {', '.join(f'{s:.1f}' for s in spreads)}: "
            f"{verdict} the evaluation spread"
        )


if __name__ == "__main__":
    main()
