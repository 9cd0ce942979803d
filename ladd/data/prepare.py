"""`ladd prepare`: the built-in UCI digits, a user's image folder + captions table, or a prompts table,
written as train / val / test splits (settings are chosen on val, figures reported on test):

    <out>/<split>/captions.parquet   id, prompt, label (-1 when unknown)
    <out>/<split>/images.safetensors images uint8 [N, C, H, W], labels int64 [N]  (not for prompt-only data)
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from ladd.config import PrepareConfig
from ladd.errors import DataError
from ladd.io import atomic_dir, read_text, save_tensors

log = logging.getLogger(__name__)

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {digit} written by hand",
    "a drawing of the digit {word}",
    "handwritten {word}",
    "an image of the number {digit}",
)
SPLITS = ("train", "val", "test")


@dataclass
class Split:
    """One split in memory: prompts always, images only for image data sets."""

    captions: pd.DataFrame  # id, prompt, label
    images: torch.Tensor | None = None  # uint8 [N, C, H, W]

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor(self.captions["label"].to_numpy(), dtype=torch.long)


def digit_prompt(label: int, rng: np.random.Generator) -> str:
    template = DIGIT_TEMPLATES[rng.integers(len(DIGIT_TEMPLATES))]
    return template.format(word=DIGIT_WORDS[label], digit=label)


def prompt_vocabulary() -> list[str]:
    """Words of the built-in prompt templates (the tiny tokenizer gives each its own token)."""
    words = {w for t in DIGIT_TEMPLATES for w in t.split() if "{" not in w}
    return sorted(words | set(DIGIT_WORDS))


def resize_images(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """float [N, C, h, w] in [0, 1] -> uint8 [N, C, r, r] (bilinear, antialiased when shrinking)."""
    out = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return (out.clamp(0, 1) * 255).round().to(torch.uint8)


def load_digits_split(resolution: int, seed: int) -> tuple[pd.DataFrame, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    images = resize_images(torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0, resolution)
    labels = digits.target.astype(np.int64)
    captions = pd.DataFrame(
        {
            "id": [f"digits-{i:04d}" for i in range(len(labels))],
            "prompt": [digit_prompt(int(y), rng) for y in labels],
            "label": labels,
        }
    )
    return captions, images


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # tab, newline and carriage return are text


def read_table(path: str | Path, encoding: str = "auto") -> pd.DataFrame:
    """A .csv (any case; text decoded by `encoding`) or .parquet table; DataError naming the file otherwise."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(io.StringIO(read_text(path, encoding)), keep_default_na=False, dtype=str)
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
    except (ValueError, OSError) as e:  # pandas' ParserError and pyarrow's ArrowInvalid are ValueErrors
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: cannot be read as a {suffix.lstrip('.')} table: {str(e).splitlines()[0]}") from None
    raise DataError(f"{path}: captions/prompts table must be .csv or .parquet")


def _rows(mask: pd.Series, ids: pd.Series) -> str:
    """'rows 3, 7 (ids a, b)' for the first few rows where `mask` holds."""
    rows = np.flatnonzero(mask.to_numpy())
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    return (
        f"row{'s' if len(rows) > 1 else ''} {', '.join(map(str, rows[:5]))}{more} "
        f"(id {', '.join(map(str, ids.iloc[rows[:5]]))})"
    )


def _prompt_table(table: pd.DataFrame, path: str) -> pd.DataFrame:
    """Normalise a user table to id, prompt, label; accepts `prompt` or `caption` columns. Every row needs a
    prompt of printable text and, where the table has labels, an integer label (rows counted from 0)."""
    text = "prompt" if "prompt" in table else "caption" if "caption" in table else None
    if text is None:
        raise DataError(f"{path}: needs a 'prompt' or 'caption' column, has {list(table.columns)}")
    ids = (
        table["id"].astype(str)
        if "id" in table
        else pd.Series([f"{Path(path).stem}-{i:06d}" for i in range(len(table))])
    )
    prompts = table[text]
    empty = prompts.isna() | (prompts.astype(str).str.strip() == "")  # parquet nulls would become "None"/"nan"
    if empty.any():
        raise DataError(f"{path}: {_rows(empty, ids)} {'have' if empty.sum() > 1 else 'has'} no {text}")
    prompts = prompts.astype(str)
    control = prompts.str.contains(_CONTROL)
    if control.any():
        raise DataError(f"{path}: {_rows(control, ids)}: the {text} holds control characters (NUL and the like)")
    labels = np.full(len(table), -1, dtype=np.int64)
    if "label" in table:
        numbers = pd.to_numeric(table["label"], errors="coerce")
        bad = ~np.isfinite(numbers.astype(float)) | (numbers.round() != numbers)
        if bad.any():
            raise DataError(
                f"{path}: {_rows(bad, ids)}: label is not an integer (give every row a label, or "
                "drop the column for unlabelled data)"
            )
        labels = numbers.to_numpy().astype(np.int64)
    return pd.DataFrame({"id": ids.to_numpy(), "prompt": prompts.to_numpy(), "label": labels})


def _rgb(im: Image.Image) -> np.ndarray:
    """[H, W, 3] floats in [0, 1]. 16-bit greyscale ("I;16", or "I" from a 16-bit PNG) is scaled by 65535:
    PIL's convert("RGB") clips it at 255, which turns such images white."""
    if im.mode.startswith("I"):
        arr = np.asarray(im, dtype=np.float32)
        scale = 255.0 if im.mode == "I" and arr.max() <= 255 else 65535.0
        return np.repeat(np.clip(arr / scale, 0, 1)[..., None], 3, axis=-1)
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def _inside(root: Path, name: str) -> Path | None:
    """`root / name` when it lies inside `root` after following links; None for absolute names, `..` and links
    that lead out."""
    path = (root / name).resolve()
    return path if not Path(name).is_absolute() and path.is_relative_to(root.resolve()) else None


def load_folder(
    images_dir: str, captions_path: str, resolution: int, encoding: str = "auto", max_pixels: int = 40_000_000
) -> tuple[pd.DataFrame, torch.Tensor]:
    table = read_table(captions_path, encoding)
    if "file" not in table:
        raise DataError(f"{captions_path}: needs a 'file' column naming images in {images_dir}")
    captions = _prompt_table(table, captions_path)
    images = []
    for row, name in enumerate(table["file"].astype(str)):
        where = f"{captions_path} row {row} (id {captions['id'][row]})"
        path = _inside(Path(images_dir), name)
        if path is None:
            raise DataError(f"{where}: file {name!r} lies outside prepare.images_dir ({images_dir})")
        try:
            with warnings.catch_warnings():  # our own cap below, before any pixel is decoded
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im_file = Image.open(path)
            with im_file as im:
                if im.width * im.height > max_pixels:
                    raise ValueError(f"it is {im.width}x{im.height}, over prepare.max_image_pixels ({max_pixels:,})")
                if min(im.size) < max(1, resolution // 4):  # more than 4x upscaling invents the image
                    raise ValueError(
                        f"it is {im.width}x{im.height}, under a quarter of prepare.resolution ({resolution})"
                    )
                arr = _rgb(im)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"{where}: cannot read image {Path(images_dir) / name}: {e}") from None
        images.append(resize_images(torch.from_numpy(arr).permute(2, 0, 1)[None], resolution)[0])
    return captions, torch.stack(images)


def split_indices(
    n: int, test_fraction: float, val_fraction: float, seed: int, groups: pd.Series | None = None
) -> dict[str, np.ndarray]:
    """Record indices of each split, drawn by seed. With `groups` (a prompt per record) whole groups are drawn,
    `test_fraction` and `val_fraction` of the distinct ones, so that no prompt is in two splits; without, records
    are. The test split is drawn first, so adding a val split leaves it as it was."""
    keys = np.arange(n) if groups is None else pd.factorize(groups, sort=True)[0]
    units = np.unique(keys)
    perm = np.random.default_rng(seed).permutation(len(units))
    n_test = max(1, int(round(len(units) * test_fraction)))
    n_val = max(1, int(round(len(units) * val_fraction))) if val_fraction > 0 else 0
    what = "records" if groups is None else "distinct prompts"
    if n_test + n_val >= len(units):
        raise DataError(
            f"prepare: {len(units)} {what} cannot fill train, val ({val_fraction:g}) and test "
            f"({test_fraction:g}): give more data or lower prepare.test_fraction / prepare.val_fraction"
        )
    chosen = {
        "test": units[perm[:n_test]],
        "val": units[perm[n_test : n_test + n_val]],
        "train": units[perm[n_test + n_val :]],
    }
    if not n_val:  # prepare.val_fraction: 0, no val split written
        del chosen["val"]
    return {name: np.flatnonzero(np.isin(keys, unit_keys)) for name, unit_keys in chosen.items()}


def write_split(split_dir: Path, split: Split) -> None:
    split_dir.mkdir(parents=True, exist_ok=True)
    split.captions.to_parquet(split_dir / "captions.parquet", index=False)
    if split.images is not None:
        save_tensors({"images": split.images.contiguous(), "labels": split.labels}, split_dir / "images.safetensors")


def load_split(split_dir: str | Path) -> Split:
    split_dir = Path(split_dir)
    captions_path = split_dir / "captions.parquet"
    if not captions_path.is_file():
        raise FileNotFoundError(f"{captions_path} is missing: run `ladd prepare` first")
    images_path = split_dir / "images.safetensors"
    captions = pd.read_parquet(captions_path)
    images = load_file(images_path)["images"] if images_path.is_file() else None
    if images is not None and len(images) != len(captions):
        raise DataError(
            f"{split_dir}: {len(captions)} records in captions.parquet but {len(images)} images in "
            "images.safetensors (files from different runs): rerun `ladd prepare`"
        )
    return Split(captions, images)


def prepare(cfg: PrepareConfig) -> dict:
    """Build the data set and replace `cfg.out_dir` atomically; returns a summary."""
    images = None
    if cfg.source == "digits":
        captions, images = load_digits_split(cfg.resolution, cfg.seed)
    elif cfg.source == "folder":
        captions, images = load_folder(cfg.images_dir, cfg.captions, cfg.resolution, cfg.encoding, cfg.max_image_pixels)
    else:
        captions = _prompt_table(read_table(cfg.captions, cfg.encoding), cfg.captions)
    log.info("prepare: %d records from %s", len(captions), cfg.source)
    summary = {"source": cfg.source, "resolution": cfg.resolution}
    # the built-in digits' prompts are 50 templates, each on dozens of images: split by image; a user's table by
    # its distinct prompts (a duplicated prompt in two splits would score training data as held out)
    groups = None if cfg.source == "digits" else captions["prompt"]
    with atomic_dir(cfg.out_dir) as tmp:
        for name, idx in split_indices(len(captions), cfg.test_fraction, cfg.val_fraction, cfg.seed, groups).items():
            split = Split(captions.iloc[idx].reset_index(drop=True), None if images is None else images[idx])
            write_split(tmp / name, split)
            summary[name] = len(idx)
    return summary
