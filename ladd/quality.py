"""Scoring generated images: Fréchet distance on a feature extractor's embeddings against the real test
images (`fd`), conditional accuracy where the extractor also classifies, precision/recall, CLIP score, and
the real-vs-real floor. (evaluate.py takes the FDs against the teacher's own samples from the same features.)

An extractor maps float images [N, C, H, W] in [0, 1] to (features, logits or None). Each entry of
FEATURE_EXTRACTORS loads one from local weights and names `key` and the path in its one-line error; nothing
downloads at run time:

- `classifier`: the embedded default's digit CNN (`ladd classifier`);
- `inception`: the standard Inception-v3 FID network of torch-fidelity (pool3, 2048 features), so that
  `fd` is the FID papers report;
- `clip`: a CLIP image tower loaded by `transformers` (its projected, normalised image embeddings).
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import types
from collections.abc import Callable
from pathlib import Path

import torch

from ladd.classifier import NOT_APPLICABLE, DigitClassifier, classify, load_classifier
from ladd.data.prepare import Split
from ladd.errors import ConfigError
from ladd.metrics import clip_score, conditional_accuracy, frechet_distance, precision_recall

FID_FEATURES = "2048"  # Inception's pool3: the FID of Heusel et al. and every paper since


def embed(extractor, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(features, logits or None) of float images in [0, 1], batched, on the CPU."""
    if isinstance(extractor, DigitClassifier):
        return classify(extractor, images)
    feats, logits = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            f, lg = extractor(images[i : i + batch_size])
            feats.append(f.float().cpu())
            logits.append(None if lg is None else lg.float().cpu())
    return torch.cat(feats), (None if logits[0] is None else torch.cat(logits))


def score_features(
    feats: torch.Tensor, logits: torch.Tensor | None, labels: torch.Tensor, real: torch.Tensor | None = None
) -> dict:
    """The figures a set of sample features supports: `fd`, precision and recall against `real`, `accuracy`
    where there are logits and labels (-1: unknown)."""
    out = {}
    if real is not None:
        out["fd"] = frechet_distance(real.numpy(), feats.numpy())
        out["precision"], out["recall"] = precision_recall(real, feats)
    if logits is not None and (labels >= 0).any():
        out["accuracy"] = conditional_accuracy(logits, labels)
    return out


def score_images(extractor, images: torch.Tensor, labels: torch.Tensor, real: torch.Tensor | None = None) -> dict:
    """images: float [N, C, H, W] in [0, 1]; labels: the prompted class (-1 unknown)."""
    return score_features(*embed(extractor, images), labels, real)


def real_features(extractor, split: Split) -> torch.Tensor:
    return embed(extractor, split.images.float() / 255)[0]


def real_floor(extractor, train: Split, test: Split, n: int, seed: int = 0, real: torch.Tensor | None = None) -> dict:
    """FD of n real train images vs the real test set (features `real`, computed if not given): the best any
    generator can score with n samples."""
    idx = torch.randperm(len(train.captions), generator=torch.Generator().manual_seed(seed))[:n]
    images = train.images[idx].float() / 255
    return score_images(extractor, images, train.labels[idx], real_features(extractor, test) if real is None else real)


def _uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    x = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class InceptionFeatures(torch.nn.Module):
    """torch-fidelity's FID Inception-v3 (TF-ported weights, its own TF-compatible resize to 299 px)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.net(_uint8_rgb(images).to(next(self.net.parameters()).device))[0], None


def _fidelity_inception_class():
    """torch-fidelity's FeatureExtractorInceptionV3. The package's __init__ imports torchvision (for its data
    sets), which has no build for a CPU-only torch wheel; the Inception module itself needs only torch, so
    where the package does not import it is loaded on its own."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except (ImportError, RuntimeError, OSError):
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None:
            raise ConfigError(
                "evaluate.features: inception needs torch-fidelity (pip install --no-deps "
                "torch-fidelity==0.4.0; scripts/setup.sh installs it)"
            ) from None
        package = types.ModuleType("torch_fidelity")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = package
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    return FeatureExtractorInceptionV3


def read_state_dict(path: Path) -> dict:
    """Tensors of a .safetensors file, or of a .pth/.pt state dict read with torch's weights-only unpickler
    (tensors and containers only: no code runs)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_inception(path: str | Path, key: str = "evaluate.inception_path") -> InceptionFeatures:
    """The FID Inception network with weights from a local file: torch-fidelity's
    `weights-inception-2015-12-05-6726825d.pth` (pytorch-fid's `pt_inception-2015-12-05-*.pth` is the same
    network under other names; convert it with torch-fidelity's util_convert_inception_weights), or a
    .safetensors copy of it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}: {path} is not a file (a local FID Inception-v3 weights file)")
    try:
        state = read_state_dict(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(
            f"{key}: {path} is not a weights file ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    network = _fidelity_inception_class()
    if not isinstance(state, dict) or "Mixed_7c.branch_pool.conv.weight" not in state:
        raise ConfigError(f"{key}: {path} does not hold the FID Inception-v3 network (no Mixed_7c weights)")
    with tempfile.TemporaryDirectory() as tmp:
        # torch-fidelity reads its weights with torch.load(weights_only=False): it is handed only this file,
        # written here from the tensors checked above, never the user's file
        trusted = Path(tmp) / "inception.pth"
        torch.save({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, trusted)
        try:
            net = network("inception-v3-compat", [FID_FEATURES], feature_extractor_weights_path=str(trusted))
        except RuntimeError as e:  # missing or misshapen tensors
            raise ConfigError(
                f"{key}: {path} is not the FID Inception-v3 network: {str(e).splitlines()[0][:200]}"
            ) from None
    return InceptionFeatures(net)


class ClipFeatures(torch.nn.Module):
    """A transformers CLIP model with its processor: image and text embeddings, projected and normalised."""

    def __init__(self, model, processor):
        super().__init__()
        self.model, self.processor = model, processor

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.processor(images=list(_uint8_rgb(images).permute(0, 2, 3, 1).numpy()), return_tensors="pt")
        emb = self.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.model.device))
        emb = getattr(emb, "pooler_output", emb)
        return torch.nn.functional.normalize(emb.float(), dim=-1).cpu()

    @torch.no_grad()
    def text_embeds(self, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
        out = []
        for i in range(0, len(prompts), batch_size):
            tokens = self.processor(
                text=prompts[i : i + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.model.config.text_config.max_position_embeddings,
            )
            emb = self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.model.device),
                attention_mask=tokens["attention_mask"].to(self.model.device),
            )
            out.append(torch.nn.functional.normalize(getattr(emb, "pooler_output", emb).float(), dim=-1).cpu())
        return torch.cat(out)

    def score(self, images: torch.Tensor, text_embeds: torch.Tensor) -> float:
        return clip_score(self.image_embeds(images), text_embeds)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.image_embeds(images), None


def load_clip(path: str | Path, key: str = "evaluate.clip_path") -> ClipFeatures:
    """A local CLIP folder (`CLIPModel.from_pretrained` + `CLIPProcessor`), checked on one image and one prompt."""
    import json

    from transformers import CLIPModel, CLIPProcessor
    from transformers.utils import logging as hf_logging

    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        raise ConfigError(f"{key}: {path} is not a CLIP model folder ({config.name} is missing)")
    kind = json.loads(config.read_text()).get("model_type")
    if kind != "clip":
        raise ConfigError(f"{key}: {path} holds a {kind!r} model, not a CLIP model (model_type 'clip')")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the processor's notes about its image backend are not the user's business
    try:
        clip = ClipFeatures(CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path))
        clip.score(torch.zeros(1, 3, 32, 32), clip.text_embeds(["a probe"]))  # a wrong image size fails here
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever transformers raises for a broken folder
        raise ConfigError(
            f"{key}: {path} does not load as a CLIP model: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return clip


def load_classifier_features(path: str | Path, key: str = "evaluate.features") -> DigitClassifier:
    if (Path(path) / NOT_APPLICABLE).is_file():
        raise ConfigError(
            f"{key}: classifier, but {path} holds no classifier (the data has no labelled images): set "
            "evaluate.features to inception (with evaluate.inception_path) or clip (with evaluate.clip_path)"
        )
    return load_classifier(path)


# name -> loader(local path, params key for errors)
FEATURE_EXTRACTORS: dict[str, Callable[..., torch.nn.Module]] = {
    "classifier": load_classifier_features,
    "inception": load_inception,
    "clip": load_clip,
}
