"""Labelled images of results people look at: training curves. Matplotlib without a display."""

from __future__ import annotations

from pathlib import Path

from ladd.io import atomic_file


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the logged points are single batches)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_curves(curve: list[dict], heads: int, path: str | Path, title: str = "", chance: float | None = None) -> Path:
    """Distillation curves: the losses (with the heads' chance level) and each head's mean real and fake
    logits, smoothed over ~5% of the run, so a glance shows whether the adversarial part worked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in curve]
    window = max(1, len(curve) // 20)
    fig, (ax_loss, ax_logits) = plt.subplots(1, 2, figsize=(12, 4.2))
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
        ax_logits.plot(steps, smooth([r[f"logits_real_h{i}"] for r in curve], window), color=color, label=f"head {i} real")
        ax_logits.plot(steps, smooth([r[f"logits_fake_h{i}"] for r in curve], window), color=color, linestyle="--",
                       label=f"head {i} fake")
    ax_logits.set(xlabel="step", ylabel="mean logit", title="discriminator heads: real (solid) vs fake (dashed)")
    ax_logits.legend(fontsize=7, ncol=2)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return path
