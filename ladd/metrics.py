"""Sample-quality metrics on classifier features: tensors/arrays in, numbers out."""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(real, fake) -> float:
    """FD between Gaussians fitted to two feature sets (Heusel et al. 2017):
    |mu_r - mu_f|^2 + tr(S_r + S_f - 2 (S_r S_f)^{1/2})."""
    mu1, s1 = gaussian_stats(real)
    mu2, s2 = gaussian_stats(fake)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():  # singular product: nudge both covariances (as pytorch-fid does)
        offset = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def conditional_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of samples the classifier assigns to the prompted class (labels < 0 are ignored)."""
    keep = labels >= 0
    return float((logits[keep].argmax(1) == labels[keep]).float().mean())


def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision/recall (Kynkäänniemi et al. 2019): precision = share of fake samples inside the
    real k-NN manifold (quality), recall = share of real samples inside the fake manifold (diversity)."""
    real, fake = real.double(), fake.double()
    r_real, r_fake = _knn_radii(real, k), _knn_radii(fake, k)
    d = torch.cdist(fake, real)  # [n_fake, n_real]
    precision = (d <= r_real[None, :]).any(1).float().mean()
    recall = (d.T <= r_fake[None, :]).any(1).float().mean()
    return float(precision), float(recall)
