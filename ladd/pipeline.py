"""Loading any SD3-family diffusers pipeline and the three things every stage does with it:
encode prompts, decode latents, know its latent shape. Nothing here assumes the tiny teacher."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline

log = logging.getLogger(__name__)

# Written beside model_index.json: what a caller of the plain diffusers pipeline must pass to get the
# same samples as ladd (the T5 slot length the model was trained with).
LADD_META = "ladd.json"
DEFAULT_MAX_SEQUENCE_LENGTH = 256  # diffusers' default for SD3


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but CUDA is not available")
    return device


def load_pipeline(src: str | Path, device: torch.device | str = "cpu", dtype=torch.float32) -> StableDiffusion3Pipeline:
    """`StableDiffusion3Pipeline.from_pretrained` for a local dir or hub id; components saved as null
    (the tiny teacher has no T5) are passed as None, as diffusers requires."""
    kwargs = {}
    index = Path(src) / "model_index.json"
    if Path(src).is_dir():
        if not index.is_file():
            raise FileNotFoundError(f"{src} is not a diffusers pipeline folder: {index} is missing")
        spec = json.loads(index.read_text())
        if spec.get("_class_name") not in ("StableDiffusion3Pipeline", None):
            log.warning("%s holds a %s; loading it as StableDiffusion3Pipeline", src, spec["_class_name"])
        for name in ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor"):
            if spec.get(name) in (None, [None, None]):
                kwargs[name] = None
    pipe = StableDiffusion3Pipeline.from_pretrained(str(src), dtype=dtype, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def read_meta(pipe_dir: str | Path) -> dict:
    path = Path(pipe_dir) / LADD_META
    return json.loads(path.read_text()) if path.is_file() else {}


def write_meta(pipe_dir: str | Path, **meta) -> None:
    (Path(pipe_dir) / LADD_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def max_sequence_length(pipe_dir: str | Path) -> int:
    return int(read_meta(pipe_dir).get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH))


def latent_shape(pipe: StableDiffusion3Pipeline) -> tuple[int, int, int]:
    size = pipe.transformer.config.sample_size
    return (pipe.transformer.config.in_channels, size, size)


@torch.no_grad()
def encode_prompts(
    pipe: StableDiffusion3Pipeline, prompts: list[str], max_sequence_length: int, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [N, L, D], pooled [N, P]) exactly as the pipeline computes them; each distinct
    prompt is encoded once."""
    unique = list(dict.fromkeys(prompts))
    embeds, pooled = [], []
    for i in range(0, len(unique), batch_size):
        chunk = unique[i : i + batch_size]
        e, _, p, _ = pipe.encode_prompt(
            prompt=chunk, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length, device=pipe._execution_device,
        )
        embeds.append(e)
        pooled.append(p)
    where = {p: i for i, p in enumerate(unique)}
    index = torch.tensor([where[p] for p in prompts], device=embeds[0].device)
    return torch.cat(embeds)[index], torch.cat(pooled)[index]


def vae_scaling(vae) -> tuple[float, float]:
    return vae.config.scaling_factor, (vae.config.shift_factor or 0.0)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """uint8 [N, C, H, W] -> scaled latents (z - shift) * scale, the transformer's x0 (posterior mean)."""
    scale, shift = vae_scaling(vae)
    param = next(vae.parameters())
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(param.device, param.dtype) / 127.5 - 1
        out.append((vae.encode(x).latent_dist.mean - shift) * scale)
    return torch.cat(out)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Scaled latents -> float images in [0, 1] [N, C, H, W] (the pipeline's own unscaling)."""
    scale, shift = vae_scaling(vae)
    param = next(vae.parameters())
    out = []
    for i in range(0, len(latents), batch_size):
        z = latents[i : i + batch_size].to(param.device, param.dtype) / scale + shift
        out.append((vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1))
    return torch.cat(out)
