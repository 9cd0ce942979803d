import numpy as np
import torch

from ladd.metrics import conditional_accuracy, frechet_distance, precision_recall


def test_fd_of_identical_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 8))
    assert abs(frechet_distance(x, x)) < 1e-6


def test_fd_of_shifted_gaussians_matches_closed_form():
    """N(0, I) vs N(mu, 4I) in d dims: |mu|^2 + d (1 + 4 - 2*2) = |mu|^2 + d."""
    rng = np.random.default_rng(0)
    d, n = 4, 200_000
    mu = np.array([1.0, -2.0, 0.5, 0.0])
    a = rng.normal(size=(n, d))
    b = mu + 2.0 * rng.normal(size=(n, d))
    assert abs(frechet_distance(a, b) - (mu @ mu + d)) < 0.1


def test_precision_recall_extremes():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 5, generator=g)
    assert precision_recall(real, real) == (1.0, 1.0)
    far = real + 100
    assert precision_recall(real, far) == (0.0, 0.0)
    collapsed = real[:1].repeat(300, 1) + 1e-3 * torch.randn(300, 5, generator=g)
    precision, recall = precision_recall(real, collapsed)
    assert precision == 1.0 and recall < 0.1  # mode collapse: high quality, no diversity


def test_conditional_accuracy_ignores_unlabelled():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, 0.0]])
    assert conditional_accuracy(logits, torch.tensor([0, 0, -1])) == 0.5
