"""Loading any SD3-family diffusers pipeline and the three things every stage does with it:
encode prompts, decode latents, know its latent shape. Nothing here assumes the tiny teacher."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ladd.errors import ConfigError, TeacherError

if TYPE_CHECKING:  # diffusers and transformers take ~3 s to import: only the stages that load a pipeline pay it
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
        raise ConfigError(f"device {name!r} was asked for but CUDA is not available (use auto or cpu)")
    return device


SD3_COMPONENTS = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


def check_sd3_folder(src: str | Path) -> dict:
    """model_index.json of an SD3-family pipeline folder (MMDiT + flow matching), checked before anything is
    loaded; TeacherError naming the folder and what is missing or wrong."""
    index = Path(src) / "model_index.json"
    if not index.is_file():
        raise TeacherError(f"{src} is not a diffusers pipeline folder: model_index.json is missing")
    spec = json.loads(index.read_text())
    if spec.get("_class_name") not in ("StableDiffusion3Pipeline", "StableDiffusion3InpaintPipeline"):
        raise TeacherError(
            f"{src} holds a {spec.get('_class_name')}, not an SD3-family pipeline "
            "(model_index.json must name StableDiffusion3Pipeline or StableDiffusion3InpaintPipeline)"
        )
    missing = [
        name for name in SD3_COMPONENTS if spec.get(name) in (None, [None, None]) or not (Path(src) / name).is_dir()
    ]
    if missing:
        raise TeacherError(
            f"{src} is not a complete SD3-family pipeline: missing {', '.join(f'{m}/' for m in missing)}"
        )
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        folder = Path(src) / name
        if folder.is_dir() and not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin")):
            raise TeacherError(
                f"{folder} holds only pickled weights (.bin): ladd loads safetensors only (loading a "
                "pickle runs its code); convert them, e.g. load and save_pretrained(safe_serialization=True)"
            )
    transformer = (
        json.loads((Path(src) / "transformer" / "config.json").read_text())
        if (Path(src) / "transformer" / "config.json").is_file()
        else {}
    )
    if transformer.get("_class_name") != "SD3Transformer2DModel":
        raise TeacherError(
            f"{src}/transformer holds a {transformer.get('_class_name', 'model without config.json')}, "
            "not an SD3Transformer2DModel (MMDiT)"
        )
    return spec


def load_pipeline(
    src: str | Path, device: torch.device | str = "cpu", dtype=torch.float32, **components
) -> StableDiffusion3Pipeline:
    """`StableDiffusion3Pipeline.from_pretrained` for a local dir or hub id; components saved as null
    (a teacher without T5) are passed as None, as diffusers requires; `components` replace loaded ones."""
    kwargs = {}
    if Path(src).is_dir():
        spec = check_sd3_folder(src)
        for name in ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor"):
            if spec.get(name) in (None, [None, None]):
                kwargs[name] = None
    elif Path(src).exists() or Path(src).is_absolute() or str(src).startswith(".") or str(src).count("/") != 1:
        raise TeacherError(f"{src} is not a folder, nor a hub id (owner/name)")
    from diffusers import StableDiffusion3Pipeline

    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(
            str(src), dtype=dtype, use_safetensors=True, **{**kwargs, **components}
        )
    except (OSError, ValueError) as e:
        if Path(src).is_dir():
            raise
        raise TeacherError(
            f"cannot load {src} from the Hub or its local cache (offline: download it, then give "
            f"its folder): {str(e).splitlines()[0]}"
        ) from e
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_transformer(src: str | Path, device: torch.device | str = "cpu", dtype=torch.float32):
    """Only the MMDiT of a pipeline folder, in `dtype` (a 2-8B teacher need not pass through fp32 in memory)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(
        str(src), subfolder="transformer", torch_dtype=dtype, use_safetensors=True
    ).to(device)


def read_meta(pipe_dir: str | Path) -> dict:
    path = Path(pipe_dir) / LADD_META
    return json.loads(path.read_text()) if path.is_file() else {}


def write_meta(pipe_dir: str | Path, **meta) -> None:
    (Path(pipe_dir) / LADD_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def max_sequence_length(pipe_dir: str | Path) -> int:
    """The T5 slot length of a pipeline folder: its ladd.json's (a ladd-made folder), else diffusers' SD3 default
    (256), whatever its T5 tokenizer allows (an SD3.5 folder's says 512: twice the text tokens in every transformer
    pass, for a length the stock pipeline never uses unless asked)."""
    return int(read_meta(pipe_dir).get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH))


def latent_shape(pipe: StableDiffusion3Pipeline) -> tuple[int, int, int]:
    """The teacher's native latent shape (C, h, w): its transformer's sample_size and output channels (an
    inpainting transformer takes more: the condition)."""
    config = pipe.transformer.config
    return (config.out_channels or config.in_channels, config.sample_size, config.sample_size)


def component_config(pipe_dir: str | Path, name: str) -> dict:
    path = Path(pipe_dir) / name / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{pipe_dir} is not an SD3-family pipeline folder: {path} is missing")
    return json.loads(path.read_text())


def _vae_factor(pipe_dir: str | Path) -> int:
    return 2 ** (len(component_config(pipe_dir, "vae")["block_out_channels"]) - 1)  # the pipeline's vae_scale_factor


def bucket_latent_shapes(pipe_dir: str | Path, resolutions, key: str) -> list[tuple[int, int, int]]:
    """Latent shapes (C, h, w) of pixel resolutions (H, W) under the pipeline in `pipe_dir` (read from its
    configs, nothing loaded); ConfigError naming `key[i]` for a size the VAE and transformer cannot take."""

    transformer, factor = component_config(pipe_dir, "transformer"), _vae_factor(pipe_dir)
    patch, limit = transformer["patch_size"], transformer.get("pos_embed_max_size")
    shapes = []
    for i, (height, width) in enumerate(resolutions):
        if height % (factor * patch) or width % (factor * patch):
            raise ConfigError(
                f"{key}[{i}]: {height}x{width} is not divisible by {factor * patch} (the teacher's VAE "
                f"factor {factor} x patch size {patch})"
            )
        if limit is not None and max(height, width) // (factor * patch) > limit:
            raise ConfigError(
                f"{key}[{i}]: {height}x{width} needs {height // (factor * patch)}x{width // (factor * patch)} "
                f"patches; the teacher's pos_embed_max_size is {limit} "
                f"(at most {limit * factor * patch} pixels a side)"
            )
        shapes.append(
            (transformer.get("out_channels") or transformer["in_channels"], height // factor, width // factor)
        )
    return shapes


def native_resolution(pipe_dir: str | Path) -> tuple[int, int]:
    """Pixel (H, W) of the teacher's native latent size (its transformer's sample_size)."""
    side = component_config(pipe_dir, "transformer")["sample_size"] * _vae_factor(pipe_dir)
    return side, side


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
            prompt=chunk,
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
            device=pipe._execution_device,
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
