"""`ladd classifier`: a small CNN trained on the real train split. Its penultimate features are the
embedding for Fréchet distance and precision/recall (no Inception weights offline); its predictions
give conditional accuracy."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ladd.config import ClassifierConfig
from ladd.data.prepare import load_split
from ladd.io import atomic_dir, save_tensors
from ladd.pipeline import pick_device

log = logging.getLogger(__name__)


class DigitClassifier(nn.Module):
    def __init__(
        self, channels: int = 1, resolution: int = 16, num_classes: int = 10, width: int = 32, features: int = 128
    ):
        super().__init__()
        self.config = dict(
            channels=channels, resolution=resolution, num_classes=num_classes, width=width, features=features
        )
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.GELU(),
            nn.Flatten(),
            nn.Linear(2 * w * (resolution // 4) ** 2, features),
            nn.GELU(),
        )
        self.head = nn.Linear(features, num_classes)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1], any channel count and size -> grey [N, 1, r, r], standardised.
        r = 16 keeps all the detail of the 8x8 UCI digits at a quarter of the cost of 32."""
        x = images.float().mean(1, keepdim=True)
        r = self.config["resolution"]
        if x.shape[-1] != r:
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        return (x - 0.5) / 0.5

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate features, logits)."""
        f = self.body(self.prepare(images))
        return f, self.head(f)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Small random affine jitter (rotation ±10°, scale ±10%, shift ±10%) so generated digits that are
    slightly off-centre are still read correctly."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=gen) - 0.5) * (math.pi / 9)
    scale = 1 + (torch.rand(n, generator=gen) - 0.5) * 0.2
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


@torch.no_grad()
def classify(model: DigitClassifier, images: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, logits) for float images in [0, 1], on CPU."""
    device = next(model.parameters(), torch.empty(0)).device
    feats, logits = [], []
    for i in range(0, len(images), batch_size):
        f, lg = model(images[i : i + batch_size].to(device))
        feats.append(f.cpu())
        logits.append(None if lg is None else lg.cpu())
    return torch.cat(feats), (None if logits[0] is None else torch.cat(logits))


def train_classifier(
    images: torch.Tensor, labels: torch.Tensor, cfg: ClassifierConfig, device, tracker
) -> DigitClassifier:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = DigitClassifier(images.shape[1], num_classes=int(labels.max()) + 1).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps)
    x_all = images.float() / 255
    for step in (bar := tqdm(range(cfg.steps), desc="classifier", mininterval=2)):
        idx = torch.randint(len(x_all), (cfg.batch_size,), generator=gen)
        x = augment(x_all[idx], gen).to(device)
        loss = F.cross_entropy(model(x)[1], labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            tracker.log_metrics({"classifier/loss": loss.item()}, step=step)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def save_classifier(model: DigitClassifier, out_dir: Path, metrics: dict) -> None:
    with atomic_dir(out_dir) as tmp:
        save_tensors({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(model.config, indent=2))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))


def load_classifier(path: str | Path, device="cpu") -> DigitClassifier:
    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path}/model.safetensors is missing: run `ladd classifier` first")
    model = DigitClassifier(**json.loads((path / "config.json").read_text()))
    model.load_state_dict(load_file(path / "model.safetensors"))
    return model.to(device).eval()


NOT_APPLICABLE = "not_applicable.json"


def classifier_stage(cfg: ClassifierConfig, data_dir: str | Path, tracker) -> dict:
    """Train on the real train split, report test accuracy, save safetensors atomically. Data without labelled
    images (prompts only, or unlabelled images) has nothing to train on: the output then holds only
    `not_applicable.json` saying why, so the stage graph and dvc.lock stay one and honest."""
    train, test = load_split(Path(data_dir) / "train"), load_split(Path(data_dir) / "test")
    if train.images is None or (train.labels < 0).any():
        reason = (
            f"{data_dir}/train has {'no images' if train.images is None else 'images without labels'}: "
            "a digit classifier needs labelled images; evaluate uses evaluate.features instead"
        )
        log.info("classifier: not applicable (%s)", reason)
        with atomic_dir(Path(cfg.out_dir)) as tmp:
            (tmp / NOT_APPLICABLE).write_text(
                json.dumps({"status": "not applicable", "reason": reason}, indent=2) + "\n"
            )
        return {"status": "not applicable", "reason": reason}
    model = train_classifier(train.images, train.labels, cfg, pick_device(cfg.device), tracker).cpu()
    _, logits = classify(model, test.images.float() / 255)
    metrics = {"test_accuracy": (logits.argmax(1) == test.labels).float().mean().item()}
    log.info("classifier test accuracy %.4f", metrics["test_accuracy"])
    tracker.log_metrics({f"classifier/{k}": v for k, v in metrics.items()})
    save_classifier(model, Path(cfg.out_dir), metrics)
    return metrics
