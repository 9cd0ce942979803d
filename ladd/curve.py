"""The distillation curve: one row per logged step (losses, logits per head, the heads' loss and real - fake gap per
student time), kept in a CSV in the report folder (DVC keeps it across a rerun: `persist`) so a run resumed from its
checkpoint continues it."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import torch

from ladd.distributed import World
from ladd.io import atomic_file
from ladd.losses import per_row

CURVE_FIELDS = (
    "step",
    "loss_d",
    "loss_g",
    "loss_adv",
    "loss_reg",
    "logits_real",
    "logits_fake",
    "grad_norm_g",
    "skipped",
)


def curve_fields(heads: int, times: int) -> list[str]:
    """The curve CSV's columns: losses, logits per head, and the heads' loss and real - fake gap per student time."""
    return [
        *CURVE_FIELDS,
        *(f"logits_{kind}_h{i}" for i in range(heads) for kind in ("real", "fake")),
        *(f"{kind}_t{k}" for k in range(times) for kind in ("loss_d", "gap")),
    ]


@torch.no_grad()
def curve_row(
    world: World,
    adversarial,
    heads: int,
    times: int,
    k,
    real_logits,
    fake_logits,
    loss_g,
    loss_adv,
    loss_reg,
    grad_norm_g,
) -> dict:
    """One curve row, over every rank's rows: the losses, the mean real and fake logits (per head too), and per
    student time the heads' loss and real - fake gap (NaN where no judged row had that time). Sums and counts
    are reduced, so ranks with more judged rows weigh more."""
    n = torch.tensor(float(len(k)))
    if len(k):
        real = [r.mean(1).float() for r in real_logits]
        fake = [f.mean(1).float() for f in fake_logits]
        row_loss = per_row(adversarial.real, real_logits).float() + per_row(adversarial.fake, fake_logits).float()
        row_gap = torch.stack(real).mean(0) - torch.stack(fake).mean(0)
        at = [k == j for j in range(times)]
        sums = [
            row_loss.sum(),
            *(x.sum() for pair in zip(real, fake) for x in pair),
            *(x for m in at for x in (row_loss[m].sum(), row_gap[m].sum(), m.sum().float())),
        ]
    else:
        sums = [torch.tensor(0.0)] * (1 + 2 * heads + 3 * times)
    sums = world.mean(torch.stack([torch.as_tensor(x, dtype=torch.float32).cpu().reshape(()) for x in [n, *sums]]))
    plain = world.mean(
        torch.stack([v.detach().float().cpu().reshape(()) for v in (loss_g, loss_adv, loss_reg, grad_norm_g)])
    )
    n, loss_sum, heads_sums, time_sums = sums[0], sums[1], sums[2 : 2 + 2 * heads], sums[2 + 2 * heads :]

    def ratio(a, b):
        return float(a / b) if b > 0 else math.nan

    row = dict(zip(("loss_g", "loss_adv", "loss_reg", "grad_norm_g"), plain.tolist()))
    row["loss_d"] = ratio(loss_sum, n)  # the heads' adversarial loss alone (R1 apart): comparable with chance
    for i in range(heads):
        row[f"logits_real_h{i}"], row[f"logits_fake_h{i}"] = (
            ratio(heads_sums[2 * i], n),
            ratio(heads_sums[2 * i + 1], n),
        )
    row["logits_real"] = sum(row[f"logits_real_h{i}"] for i in range(heads)) / heads
    row["logits_fake"] = sum(row[f"logits_fake_h{i}"] for i in range(heads)) / heads
    for j in range(times):
        loss_j, gap_j, n_j = time_sums[3 * j : 3 * j + 3]
        row[f"loss_d_t{j}"], row[f"gap_t{j}"] = ratio(loss_j, n_j), ratio(gap_j, n_j)
    return row


def curve_path(report_dir: str | Path) -> Path:
    """<distill.report_dir>/distill_curve.csv (its image beside it, .png): DVC plots it; kept in git with the run
    report."""
    return Path(report_dir) / "distill_curve.csv"


def read_curve(path: Path, before_step: int) -> list[dict]:
    if not path.is_file():
        return []
    rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(path.open())]
    return [{**row, "step": int(row["step"])} for row in rows if row["step"] < before_step]  # "step" stays an int


def write_curve(path: Path, rows: list[dict], heads: int, times: int) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=curve_fields(heads, times))
    writer.writeheader()
    writer.writerows(rows)
    with atomic_file(path) as tmp:
        tmp.write_text(buf.getvalue())
