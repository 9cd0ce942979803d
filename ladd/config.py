"""Typed, frozen per-stage configs loaded from params.yaml.

Every section is validated before any stage starts: an unknown key, a wrong type or a missing input
path raises `ConfigError` naming the file and the key, so a bad edit never costs a run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


def must_exist(default=None):
    """A path field that must exist on disk when it is set."""
    return field(default=default, metadata={"must_exist": True})


@dataclass(frozen=True)
class PrepareConfig:
    source: str = "digits"  # digits | folder | prompts
    resolution: int = 32
    test_fraction: float = 0.2
    seed: int = 0
    images_dir: str | None = must_exist()  # source=folder: image files named in the captions table
    captions: str | None = must_exist()  # source=folder|prompts: csv or parquet table
    out_dir: str = "data/prepared"

    def __post_init__(self):
        _choice("prepare.source", self.source, ("digits", "folder", "prompts"))
        if self.source == "folder" and not (self.images_dir and self.captions):
            raise ConfigError("prepare.source=folder needs prepare.images_dir and prepare.captions")
        if self.source == "prompts" and not self.captions:
            raise ConfigError("prepare.source=prompts needs prepare.captions (a prompts table)")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"prepare.test_fraction must be in (0, 1), got {self.test_fraction}")


@dataclass(frozen=True)
class ClassifierConfig:
    steps: int = 800
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0
    device: str = "auto"
    out_dir: str = "models/classifier"


@dataclass(frozen=True)
class TeacherConfig:
    pretrained: str | None = None  # local dir or hub id of any SD3-family pipeline; skips pretraining
    out_dir: str = "models/teacher"
    max_sequence_length: int | None = None  # T5 slot length; None: 16 for the tiny teacher, 256 otherwise
    # tiny embedded teacher
    text_hidden_size: int = 32
    text_max_length: int = 16
    vae_channels: tuple[int, ...] = (16, 32, 32)
    vae_steps: int = 600
    vae_batch_size: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-4
    num_layers: int = 4
    num_heads: int = 2
    head_dim: int = 32
    patch_size: int = 2
    shift: float = 1.0
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    ema_decay: float = 0.995
    caption_dropout: float = 0.1
    logit_mean: float = 0.0
    logit_std: float = 1.0
    seed: int = 0
    device: str = "auto"


@dataclass(frozen=True)
class Params:
    prepare: PrepareConfig
    classifier: ClassifierConfig
    teacher: TeacherConfig


SECTIONS: dict[str, type] = typing.get_type_hints(Params)


def _choice(key: str, value, allowed: tuple):
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {allowed}, got {value!r}")


def _coerce(value, tp, key: str):
    """Check `value` against the annotation `tp`; ints are accepted for floats, lists for tuples."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        inner = typing.get_args(tp)[0]
        return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (tp in (int, float) and isinstance(value, bool)) or not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def build_section(cls: type, data: dict | None, section: str, source: str = "params.yaml"):
    """One frozen config from a mapping, with errors that name `source` and `section.key`."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: section {section!r} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{source}: unknown key {section}.{unknown[0]} (known: {', '.join(names)})")
    values = {}
    for name, value in data.items():
        key = f"{section}.{name}"
        try:
            values[name] = _coerce(value, hints[name], key)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        if names[name].metadata.get("must_exist") and values[name] is not None:
            if not Path(values[name]).exists():
                raise ConfigError(f"{source}: {key}: path does not exist: {values[name]}")
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Parse and validate every section of a params file (missing sections take defaults)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section {unknown[0]!r} (known: {', '.join(SECTIONS)})")
    return Params(**{name: build_section(cls, raw.get(name), name, str(path)) for name, cls in SECTIONS.items()})
