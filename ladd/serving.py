"""Serving the student: one request contract for the registered MLflow models (PyTorch and ONNX), `OnnxStudent`
and `ladd generate`, and the MLflow loader of both models (`_load_pyfunc`, found through the model's code_paths).

A request is prompts, optional steps (default: the student's) and optional seeds (default: fresh, reported back).
It is checked whole before any model work, so a bad one is refused in microseconds, naming the field: steps only
among the counts the student trained at (any other count is slower or worse, and an unbounded one ties a worker),
at most `max_prompts` prompts of at most `max_prompt_chars` characters (the tokenizers keep only their first 77
CLIP / max_sequence_length T5 tokens, so a longer prompt is work for nothing), seeds in [0, 2^32).

Noise: record i's x_1 and its re-noising draws come from numpy's `default_rng(seed_i)`, drawn as [steps, C, h, w]
(x_1, then one per step after the first), in every runtime: the served PyTorch student, the ONNX one and `ladd
generate` give the same image for the same seed (up to the ONNX export's parity), whatever else is in the batch.
"""

from __future__ import annotations

import base64
import io
import json
import math
import numbers
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ladd.config import ServeConfig

MAX_SEED = 2**32 - 1
LIMITS = asdict(ServeConfig())  # a model's defaults; `serve` in params.yaml sets them


class RequestError(ValueError):
    """A request the student does not serve; the message names the field (a served model answers 400)."""


@dataclass(frozen=True)
class Request:
    prompts: list[str]
    steps: int
    seeds: list[int]


def _missing(value) -> bool:  # a column a client left out of some rows arrives as NaN or None
    return value is None or (isinstance(value, float) and math.isnan(value))


def check_request(
    prompts, steps=None, seeds=None, *, trained_steps, default_steps: int, max_prompts: int, max_prompt_chars: int
) -> Request:
    """The request, checked: `seeds` one per prompt (None or a missing entry: a fresh one)."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise RequestError("prompt: at least one prompt is needed")
    if len(prompts) > max_prompts:
        raise RequestError(f"prompt: {len(prompts)} prompts in one request; this model serves at most {max_prompts}")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise RequestError(f"prompt[{i}]: must be a string, got {type(prompt).__name__} {str(prompt)[:40]!r}")
        if len(prompt) > max_prompt_chars:
            raise RequestError(f"prompt[{i}]: {len(prompt)} characters; this model serves at most {max_prompt_chars}")
    if _missing(steps):
        steps = default_steps
    if (
        isinstance(steps, bool)
        or not isinstance(steps, numbers.Real)
        or steps != int(steps)
        or int(steps) not in trained_steps
    ):
        raise RequestError(
            f"steps: {str(steps)[:40]} is not one of the student's trained step counts {sorted(trained_steps)}"
        )
    seeds = [None] * len(prompts) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise RequestError(f"seed: {len(seeds)} seeds for {len(prompts)} prompts")
    checked = []
    for i, seed in enumerate(seeds):
        if _missing(seed):
            seed = secrets.randbelow(MAX_SEED + 1)
        if (
            isinstance(seed, bool)
            or not isinstance(seed, numbers.Real)
            or seed != int(seed)
            or not 0 <= seed <= MAX_SEED
        ):
            raise RequestError(f"seed[{i}]: {str(seed)[:40]} is not an integer in [0, {MAX_SEED}]")
        checked.append(int(seed))
    return Request([str(p) for p in prompts], int(steps), checked)


def seeded_draws(seeds: list[int], steps: int, shape) -> tuple[np.ndarray, np.ndarray]:
    """x_1 [N, *shape] and the re-noising draws [steps - 1, N, *shape] of each record, from its own seed."""
    draws = np.stack(
        [np.random.default_rng(s).standard_normal((steps, *shape), dtype=np.float32) for s in seeds], axis=1
    )
    return draws[0], draws[1:]


def png(array: np.ndarray) -> str:
    """uint8 [H, W] or [H, W, C] -> base64 PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def unpng(text, field: str) -> np.ndarray:
    """A base64 PNG -> uint8 [C, H, W]; RequestError naming `field` for anything else."""
    from PIL import Image, UnidentifiedImageError

    try:
        arr = np.asarray(Image.open(io.BytesIO(base64.b64decode(text, validate=True))))
    except (TypeError, ValueError, UnidentifiedImageError, OSError):
        raise RequestError(f"{field}: not a base64 PNG") from None
    return (arr[..., None] if arr.ndim == 2 else arr).transpose(2, 0, 1)


def inpaint_inputs(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """An inpainting request's images [N, C, H, W] in [0, 1] and masks [N, 1, H, W] (1: fill, white in the PNG)."""
    images, masks = [], []
    for i, row in enumerate(rows):
        for key in ("image_png", "mask_png"):
            if _missing(row.get(key)) or not row.get(key):
                raise RequestError(
                    f"{key}[{i}]: an inpainting student needs image_png and mask_png (base64 PNGs) beside the prompt"
                )
        image, mask = unpng(row["image_png"], f"image_png[{i}]"), unpng(row["mask_png"], f"mask_png[{i}]")
        if mask.shape[-2:] != image.shape[-2:]:
            raise RequestError(f"mask_png[{i}]: mask is {tuple(mask.shape[-2:])}, the image {tuple(image.shape[-2:])}")
        covered = float((mask[:1] > 127.5).mean())
        if covered in (0.0, 1.0):
            raise RequestError(
                f"mask_png[{i}]: mask is all {'black' if covered == 0 else 'white'}: nothing to "
                f"{'inpaint' if covered == 0 else 'keep'}"
            )
        images.append(image.astype(np.float32) / 255)
        masks.append((mask[:1] > 127.5).astype(np.float32))
    try:
        return np.stack(images), np.stack(masks)
    except ValueError:
        raise RequestError("image_png: the images of one request must have one size") from None


def _rows(model_input) -> list[dict]:
    if hasattr(model_input, "to_dict"):
        return model_input.to_dict("records")
    if isinstance(model_input, dict):  # a dict of columns
        return [dict(zip(model_input, values)) for values in zip(*model_input.values())]
    raise RequestError("inputs: a table of prompt (and optional steps, seed) columns is needed")


class ServedStudent:
    """A pyfunc model of the student, prompts in, base64 PNGs out; `generate` is the runtime's (PyTorch or ONNX)."""

    def __init__(self, generate, meta: dict, config: dict | None):
        from ladd.schedules import trained_step_counts

        self.generate, self.inpaint = generate, meta.get("task") == "inpaint"
        trained = meta.get("trained_steps") or trained_step_counts(meta)  # an ONNX export lists them
        self.rules = {
            "trained_steps": trained,
            "default_steps": int(meta.get("default_steps", 4)),
            **LIMITS,
            **{k: int(v) for k, v in (config or {}).items() if k in LIMITS},
        }

    def predict(self, model_input, params=None):
        import pandas as pd

        try:
            rows = _rows(model_input)
            if len(rows) > self.rules["max_prompts"]:  # before reading any row
                raise RequestError(
                    f"prompt: {len(rows)} prompts in one request; this model serves at most {self.rules['max_prompts']}"
                )
            steps = {r.get("steps") for r in rows if not _missing(r.get("steps"))}
            if len(steps) > 1:
                raise RequestError(f"steps: one step count per request, got {sorted(steps)}")
            request = check_request(
                [r.get("prompt") for r in rows], next(iter(steps), None), [r.get("seed") for r in rows], **self.rules
            )
            images = self.generate(request, inpaint_inputs(rows) if self.inpaint else None)
        except RequestError as e:
            from mlflow.exceptions import MlflowException  # served: a 400 whose message is this line

            raise MlflowException.invalid_parameter_value(str(e)) from None
        return pd.DataFrame(
            {
                "prompt": request.prompts,
                "seed": request.seeds,
                "steps": request.steps,
                "image_png": [png(image) for image in images],
            }
        )


def torch_generate(student_dir):
    """prompts -> uint8 images [N, H, W, C] with the PyTorch student in `student_dir` (one batch, on the CPU or GPU)."""
    import torch

    from ladd.generate import generate_latents
    from ladd.inpaint import inpaint_condition
    from ladd.pipeline import decode_latents, encode_prompts, latent_shape, load_pipeline, pick_device, read_meta
    from ladd.schedules import student_sigmas

    device = pick_device()  # bf16 on a GPU: a 2-8B student's serving copy in half the memory
    pipe = load_pipeline(student_dir, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    meta = read_meta(student_dir)

    def generate(request: Request, inpaint) -> np.ndarray:
        embeds, pooled = encode_prompts(pipe, request.prompts, int(meta.get("max_sequence_length", 256)))
        noise, step_noise = seeded_draws(request.seeds, request.steps, latent_shape(pipe))
        condition = None
        if inpaint is not None:  # inpaint_condition takes images in [0, 255]
            condition = inpaint_condition(pipe.vae, torch.from_numpy(inpaint[0] * 255), torch.from_numpy(inpaint[1]))
        latents = generate_latents(
            pipe.transformer,
            embeds,
            pooled,
            torch.from_numpy(noise),
            student_sigmas(request.steps, meta),
            sampler=meta.get("sampler", "euler"),
            step_noise=torch.from_numpy(step_noise),
            condition=condition,
        )
        images = (decode_latents(pipe.vae, latents) * 255).round().byte().cpu()
        return images.permute(0, 2, 3, 1).numpy()

    return generate, meta


def onnx_generate(onnx_dir, precision: str = "fp32", provider: str = "auto"):
    from ladd.onnx_runtime import OnnxStudent

    student = OnnxStudent(onnx_dir, precision, provider)

    def generate(request: Request, inpaint) -> np.ndarray:
        images, masks = inpaint if inpaint is not None else (None, None)
        return student.run(request, images, masks)

    return generate, student.meta


def _load_pyfunc(data_path, model_config=None) -> ServedStudent:
    """MLflow's entry point (loader_module): an ONNX export (manifest.json) or a student pipeline folder."""
    data = Path(data_path)
    generate, meta = onnx_generate(data) if (data / "manifest.json").is_file() else torch_generate(data)
    return ServedStudent(generate, meta, model_config)


def served_meta(folder) -> dict:
    """What `ServedStudent` reads of a folder: the student's ladd.json, or an ONNX export's manifest."""
    folder = Path(folder)
    path = folder / "manifest.json" if (folder / "manifest.json").is_file() else folder / "ladd.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def inpainting(folder) -> bool:
    return served_meta(folder).get("task") == "inpaint"


def image_size(folder) -> tuple[int, int, int]:
    """(channels, H, W) of the images a folder's student takes and makes at its native size."""
    folder = Path(folder)
    if (folder / "manifest.json").is_file():
        m = served_meta(folder)
        return (m["image_channels"], *m["image_size"])
    from ladd.pipeline import component_config, native_resolution

    return (component_config(folder, "vae")["in_channels"], *native_resolution(folder))


def inpaint_example(folder) -> dict:
    """An inpainting student's example inputs: a grey image at its native size, a box mask in the middle."""
    c, h, w = image_size(folder)
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255
    return {"image_png": [png(np.full((h, w, c), 128, np.uint8))], "mask_png": [png(mask)]}


# what each served model imports (ladd's own code travels in the model): pinned to the versions installed here, by
# their public release (a local build such as torch's +cpu pins its release: a GPU host then gets its CUDA build)
SERVED_PACKAGES = {
    "torch": (
        "torch",
        "diffusers",
        "transformers",
        "tokenizers",
        "safetensors",
        "accelerate",
        "numpy",
        "scipy",
        "pandas",
        "pillow",
        "tqdm",
    ),
    "onnx": ("onnxruntime-gpu", "tokenizers", "numpy", "pandas", "pillow"),
}


def served_requirements(kind: str) -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in SERVED_PACKAGES[kind]]
