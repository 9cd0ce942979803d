"""Sample-quality metrics on extractor features: tensors/arrays in, numbers out."""

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
    r, f = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    if min(len(r), len(f)) <= r.shape[1]:
        return _frechet_distance_low_rank(r, f)
    mu1, s1 = gaussian_stats(r)
    mu2, s2 = gaussian_stats(f)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():  # singular product: nudge both covariances (as pytorch-fid does)
        offset = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _frechet_distance_low_rank(r: np.ndarray, f: np.ndarray) -> float:
    """The same FD when there are no more samples than feature dimensions (2048 Inception features, a few
    hundred prompts): with S_r = A A^T and S_f = B B^T (A, B the centred samples over sqrt(n - 1)), the nonzero
    eigenvalues of S_r S_f are those of the small PSD matrix (A^T B)(A^T B)^T, so tr (S_r S_f)^{1/2} is exact
    from an n x n eigendecomposition instead of a singular d x d matrix square root."""
    a = (r - r.mean(0)).T / np.sqrt(len(r) - 1)
    b = (f - f.mean(0)).T / np.sqrt(len(f) - 1)
    c = a.T @ b  # [n_r, n_f]; (c c^T) and (c^T c) share their nonzero eigenvalues: take the smaller
    gram = c @ c.T if c.shape[0] <= c.shape[1] else c.T @ c
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0, None)).sum()
    return float(((r.mean(0) - f.mean(0)) ** 2).sum() + (a * a).sum() + (b * b).sum() - 2 * trace_sqrt)


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


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> float:
    """CLIP score (Hessel et al. 2021, as torchmetrics and papers report it): 100 * max(cos(image, text), 0),
    averaged over pairs; both inputs L2-normalised [N, D], row i of one paired with row i of the other."""
    return float((100 * (image_embeds * text_embeds).sum(-1)).clamp(min=0).mean())
