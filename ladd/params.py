"""Reading a params file into `ladd.config.Params`, before any stage starts: an unknown key, a wrong type, a
missing input path or settings that contradict the data raise `ConfigError` naming the file and the key, so a
bad edit never costs a run."""

from __future__ import annotations

import csv
import dataclasses
import io
import types
import typing
from pathlib import Path

import yaml

from ladd.config import Params, resolve_features
from ladd.errors import ConfigError, DataError

SECTIONS: dict[str, type] = typing.get_type_hints(Params)


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
    params = Params(**{name: build_section(cls, raw.get(name), name, str(path)) for name, cls in SECTIONS.items()})
    _check_across_sections(params, str(path))
    return params


def _table_columns(path: str, encoding: str) -> list[str]:
    """Column names of a csv/parquet table, read from its header; DataError (exit 3) for one that cannot be read."""
    from ladd.io import read_text

    if path.lower().endswith(".csv"):
        return next(csv.reader(io.StringIO(read_text(path, encoding))), [])
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path).names
    except Exception as e:  # pyarrow's ArrowInvalid and the like
        raise DataError(f"{path}: cannot be read as a parquet table: {str(e).splitlines()[0]}") from None


def _check_across_sections(p: Params, source: str) -> None:
    """Settings that contradict the data: found here, before a run spends hours on stages that cannot finish."""
    e, prep = p.evaluate, p.prepare
    unlabelled = prep.source == "prompts" or (
        prep.source == "folder" and "label" not in _table_columns(prep.captions, prep.encoding)
    )
    if unlabelled and e.features == "classifier":
        raise ConfigError(
            f"{source}: evaluate.features: classifier needs labelled images, and {prep.captions} has none "
            "(prompts only, or no 'label' column): set evaluate.features to inception (with "
            "evaluate.inception_path) or clip (with evaluate.clip_path)"
        )
    try:  # auto: the classifier for labelled images, else the CLIP or Inception weights given
        resolve_features(e.features, not unlabelled, e.clip_path, e.inception_path)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err} ({prep.captions} has no labelled images)") from None
    if unlabelled and p.align.enabled and p.align.reward == "classifier":
        raise ConfigError(
            f"{source}: align.reward: classifier scores the prompted digit, and {prep.captions} has no "
            "labels: use align.reward: clip (with align.reward_path) or a reward of ladd.align.REWARDS"
        )
    if p.inpaint.enabled and prep.source == "prompts":
        raise ConfigError(
            f"{source}: inpaint.enabled: inpainting fills a masked image, and prepare.source is prompts "
            "(no images): use digits or folder (images and captions)"
        )
    if p.inpaint.enabled and p.align.enabled:
        raise ConfigError(
            f"{source}: align.enabled: the preference stage aligns text-to-image students; with "
            "inpaint.enabled set it to false"
        )
    if prep.source == "prompts":
        if e.real_images == "required":
            raise ConfigError(
                f"{source}: evaluate.real_images: required, but prepare.source is prompts (no real "
                "images): use auto or off; fd_teacher needs none"
            )
        if e.gate_metric == "fd":
            raise ConfigError(
                f"{source}: evaluate.gate_metric: fd is measured against real images, and prepare.source "
                "is prompts: use fd_teacher (or auto)"
            )
        if e.gate_metric == "auto" and len(e.seeds) < 2:
            raise ConfigError(
                f"{source}: evaluate.seeds: prompts-only data gates on fd_teacher, which compares with "
                "the teacher's samples of another seed: give two or more seeds"
            )
