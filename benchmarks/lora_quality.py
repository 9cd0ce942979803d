"""Benchmark: LoRA students against full fine-tuning on the embedded default: same teacher, synthetic data, seed,
step budget and evaluation seeds.

    python benchmarks/lora_quality.py [--ranks 4,16,64] [--lr-g 3e-4] [--targets attention,...] [--steps N]

Rows: params.yaml's distill section as it is (`student: full`), then with `student: lora` at each rank
(params.yaml's lora_targets and alpha, --lr-g for the adapters). Each is trained and scored by
`benchmarks/ladd_methods.py`'s `train_and_score` (cached in --out). Columns: trained parameters, seconds per
step, FD at 1/2/4 steps (mean ± std over evaluate.seeds), accuracy, FD over full's, and LoRA - full FD per
sampling seed (paired: the same noise). Targets: at some rank, FD@4 <= 1.05x full's and FD@1 <= 1.10x.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from ladd_methods import fmt, train_and_score
from machine import describe

from ladd.params import load_params


def paired(lora: dict, full: dict, k: str) -> str:
    diffs = np.array([a["fd"] - b["fd"] for a, b in zip(lora[k]["per_seed"], full[k]["per_seed"])])
    return f"{diffs.mean():+.1f}±{diffs.std(ddof=1):.1f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--ranks", default="4,16,64")
    ap.add_argument("--lr-g", type=float, default=3e-4, help="the adapters' learning rate (full keeps distill.lr_g)")
    ap.add_argument("--targets", default=None, help="distill.lora_targets, comma-separated (default: params.yaml's)")
    ap.add_argument("--steps", type=int, default=None, help="distillation steps per row (default: distill.steps)")
    ap.add_argument("--out", default="reports/methods")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--split",
        choices=("val", "test"),
        default="val",
        help="val to choose (a rank, an lr), test to report the chosen ones",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    steps, out = args.steps or params.distill.steps, Path(args.out)
    targets = {"lora_targets": args.targets.split(",")} if args.targets else {}
    rows = [("full", train_and_score(params, "default", steps, out, split=args.split))]
    for rank in (int(r) for r in args.ranks.split(",")):
        print(f"== LoRA rank {rank}", flush=True)
        rows.append(
            (
                f"LoRA r={rank}",
                train_and_score(
                    params,
                    "default",
                    steps,
                    out,
                    {"student": "lora", "lora_rank": rank, "lr_g": args.lr_g, **targets},
                    args.split,
                ),
            )
        )
    full = rows[0][1]["metrics"]["student"]
    ks = sorted(full, key=int)
    teacher = rows[0][1]["metrics"]["teacher"]
    head = [
        "student",
        "trained params",
        "lr_g",
        "s/step",
        *[f"FD@{k}" for k in ks],
        *[f"acc@{k}" for k in ks],
        *[f"FD@{k}/full" for k in ks],
        *[f"LoRA - full @{k} (paired)" for k in ks],
    ]
    lines = [
        f"{steps} steps each; {rows[0][1]['metrics']['num_samples']} {args.split} prompts x "
        f"{len(rows[0][1]['metrics']['seeds'])} seeds, mean ± std over seeds; teacher {teacher['steps']} steps "
        f"CFG {teacher['guidance']:g}: FD {fmt(teacher, 'fd')}, accuracy {teacher['accuracy']:.3f}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, r in rows:
        s, lr = r["metrics"]["student"], r["settings"]["lr_g"]
        cells = [
            name,
            f"{r['train']['trained_parameters'] / 1e6:.3f} M",
            f"{lr:g}",
            f"{r['train']['sec_per_step']:.3f}",
            *[fmt(s[k], "fd") for k in ks],
            *[f"{s[k]['accuracy']:.3f}" for k in ks],
            *[f"{s[k]['fd'] / full[k]['fd']:.3f}" for k in ks],
            *[("–" if name == "full" else paired(s, full, k)) for k in ks],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Targets: at some rank FD@4/full <= 1.05 and FD@1/full <= 1.10. Paired: LoRA FD minus full FD per "
        "sampling seed (same noise), mean ± std; negative: LoRA better. s/step: this run's machine, steady state.",
    ]
    text = describe() + "\n\n" + "\n".join(lines)
    (out / f"lora.{args.split}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
