"""Scoring generated images against the real test set: FD on a feature extractor's embeddings,
conditional accuracy (when it also classifies), precision/recall, and the real-vs-real floor.

The extractor is pluggable: any module whose forward maps float images in [0, 1] to
(features, logits or None), loaded from a local path by an entry of FEATURE_EXTRACTORS. The embedded
default is the digit classifier; for your own teacher and data add e.g. an Inception or CLIP image
encoder loaded from local weights (nothing downloads at run time)."""

from __future__ import annotations

import torch

import math
from typing import Callable

from ladd.classifier import DigitClassifier, classify, load_classifier
from ladd.data.prepare import Split
from ladd.metrics import conditional_accuracy, frechet_distance, precision_recall

FEATURE_EXTRACTORS: dict[str, Callable[[str], torch.nn.Module]] = {"classifier": load_classifier}


def score_images(classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor, real_features: torch.Tensor) -> dict:
    """images: float [N, C, H, W] in [0, 1]; labels: the prompted class (-1 unknown)."""
    feats, logits = classify(classifier, images)
    precision, recall = precision_recall(real_features, feats)
    return {
        "fd": frechet_distance(real_features.numpy(), feats.numpy()),
        "accuracy": conditional_accuracy(logits, labels) if logits is not None and (labels >= 0).any() else math.nan,
        "precision": precision,
        "recall": recall,
    }


def real_features(classifier: DigitClassifier, split: Split) -> torch.Tensor:
    return classify(classifier, split.images.float() / 255)[0]


def real_floor(classifier: DigitClassifier, train: Split, test: Split, n: int, seed: int = 0) -> dict:
    """FD of n real train images vs the real test set: the best any generator can score with n samples."""
    idx = torch.randperm(len(train.captions), generator=torch.Generator().manual_seed(seed))[:n]
    images = train.images[idx].float() / 255
    return score_images(classifier, images, train.labels[idx], real_features(classifier, test))
