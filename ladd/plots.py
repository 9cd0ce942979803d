"""Labelled images of results people look at: training curves (matplotlib without a display) and sample grids."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from ladd.io import atomic_file


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the logged points are single batches)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_curves(
    curve: list[dict],
    heads: int,
    path: str | Path,
    title: str = "",
    chance: float | None = None,
    times: list[float] | None = None,
) -> Path:
    """Distillation curves: the losses (with the heads' chance level), each head's mean real and fake logits,
    and the heads' real - fake gap at each student time, smoothed over ~5% of the run, so a glance shows
    whether (and at which student times) the adversarial part worked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in curve]
    window = max(1, len(curve) // 20)
    fig, (ax_loss, ax_logits, ax_times) = plt.subplots(1, 3, figsize=(17, 4.2))
    for key in ("loss_d", "loss_adv", "loss_reg"):
        if curve and key in curve[0]:
            ax_loss.plot(steps, smooth([r[key] for r in curve], window), label=key)
    if chance is not None:
        ax_loss.axhline(chance, color="grey", linestyle=":", label="heads at chance")
    ax_loss.set(xlabel="step", ylabel="loss", title=f"losses (moving average of {window} logged points)")
    ax_loss.legend()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i in range(heads):
        color = colors[i % len(colors)]
        ax_logits.plot(
            steps, smooth([r[f"logits_real_h{i}"] for r in curve], window), color=color, label=f"head {i} real"
        )
        ax_logits.plot(
            steps,
            smooth([r[f"logits_fake_h{i}"] for r in curve], window),
            color=color,
            linestyle="--",
            label=f"head {i} fake",
        )
    ax_logits.set(xlabel="step", ylabel="mean logit", title="discriminator heads: real (solid) vs fake (dashed)")
    ax_logits.legend(fontsize=7, ncol=2)
    judged = 0
    for k, t in enumerate(times or []):
        points = [(r["step"], r[f"gap_t{k}"]) for r in curve if math.isfinite(r.get(f"gap_t{k}", math.nan))]
        if points:
            judged += 1
            ax_times.plot([s for s, _ in points], smooth([g for _, g in points], window), label=f"student t = {t:.3g}")
    ax_times.axhline(0, color="grey", linestyle=":")
    ax_times.set(xlabel="step", ylabel="real - fake logit", title="heads' gap per student time (judged times only)")
    if judged:
        ax_times.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return path


def plot_align_curve(curve: list[dict], path: str | Path, title: str = "") -> Path:
    """The preference stage's curves: DPO loss (chance: log 2), implicit reward accuracy, fresh samples' reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in curve if "loss" in r]
    window = max(1, len(trained) // 20)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in trained]
    axes[0].plot(steps, smooth([r["loss"] for r in trained], window))
    axes[0].axhline(math.log(2), color="grey", linestyle=":", label="log 2 (policy = reference)")
    axes[0].set(xlabel="step", ylabel="DPO loss", title=f"DPO loss (moving average of {window})")
    axes[0].legend()
    axes[1].plot(steps, smooth([r["implicit_accuracy"] for r in trained], window))
    axes[1].axhline(0.5, color="grey", linestyle=":")
    axes[1].set(xlabel="step", ylabel="share of pairs", title="implicit reward accuracy (winner preferred)")
    probes = [(r["step"], r["probe_reward"]) for r in curve if "probe_reward" in r]
    axes[2].plot([s for s, _ in probes], [v for _, v in probes], marker="o")
    axes[2].set(xlabel="step", ylabel="mean reward", title="reward of fresh samples (new seeds)")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return Path(path)


def save_grid(
    images: torch.Tensor,
    path: Path,
    ncol: int = 10,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    scale: int = 3,
) -> Path:
    """float [N, C, H, W] in [0, 1] -> one PNG, `ncol` images a row, upscaled `scale`x; with `row_labels`, each
    row is named in a margin on its left; with `col_labels` (the prompts), each column's text sits under it."""
    n, c, h, w = images.shape
    rows = -(-n // ncol)
    canvas = torch.ones(c, rows * (h + 2), ncol * (w + 2))
    for i, img in enumerate(images):
        r, k = divmod(i, ncol)
        canvas[:, r * (h + 2) + 1 : r * (h + 2) + 1 + h, k * (w + 2) + 1 : k * (w + 2) + 1 + w] = img
    arr = (canvas.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    grid = Image.fromarray(arr[..., 0] if c == 1 else arr).convert("RGB")
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    font = ImageFont.load_default(size=13)
    if col_labels:
        cell = (w + 2) * scale
        wrapped = [textwrap.wrap(label, max(4, cell // 7))[:4] for label in col_labels[:ncol]]
        lines = max(len(t) for t in wrapped)
        captioned = Image.new("RGB", (grid.width, grid.height + 6 + 15 * lines), "white")
        captioned.paste(grid, (0, 0))
        draw = ImageDraw.Draw(captioned)
        for k, text in enumerate(wrapped):
            for j, line in enumerate(text):
                draw.text((k * cell + cell // 2, grid.height + 4 + 15 * j), line, fill="black", font=font, anchor="ma")
        grid = captioned
    if row_labels:
        margin = 8 + max(int(ImageDraw.Draw(grid).textlength(label, font=font)) for label in row_labels)
        labelled = Image.new("RGB", (grid.width + margin, grid.height), "white")
        labelled.paste(grid, (margin, 0))
        draw = ImageDraw.Draw(labelled)
        for r, label in enumerate(row_labels[:rows]):
            draw.text((4, (r * (h + 2) + 1 + h // 2) * scale), label, fill="black", font=font, anchor="lm")
        grid = labelled
    with atomic_file(path) as tmp:
        grid.save(tmp, format="PNG")
    return path
