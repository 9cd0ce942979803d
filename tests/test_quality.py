import torch

from ladd.data.prepare import load_split
from ladd.quality import FEATURE_EXTRACTORS, real_features, score_images


class MeanPixels(torch.nn.Module):
    """A stand-in for a user's extractor (features only, no classes)."""

    def forward(self, images):
        return images.mean(1).flatten(1)[:, ::8], None


def test_pluggable_feature_extractor(prepared_data, monkeypatch):
    monkeypatch.setitem(FEATURE_EXTRACTORS, "mean_pixels", lambda path: MeanPixels())
    extractor = FEATURE_EXTRACTORS["mean_pixels"]("unused")
    test = load_split(prepared_data / "test")
    real = real_features(extractor, test)
    same = score_images(extractor, test.images.float() / 255, test.labels, real)
    assert abs(same["fd"]) < 1e-6 and "accuracy" not in same and same["precision"] == 1.0  # no logits: no accuracy
    noisy = score_images(
        extractor, (test.images.float() / 255 + 0.3 * torch.rand(test.images.shape)).clamp(0, 1), test.labels, real
    )
    assert noisy["fd"] > 1.0
