"""Great Expectations suites for what flows between stages: prompt tables, image data, synthetic latents.

Each suite runs on a pandas frame (one row per record, or per image/latent with its statistics) through
an ephemeral GX context. A failure raises `ValidationFailed` naming the expectation, the column and the
offending record ids, after writing a readable report (JSON + Markdown) under `report_dir`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ladd.data.prepare import SPLITS, load_split
from ladd.data.synthetic import iter_shards
from ladd.errors import ValidationFailed
from ladd.io import atomic_file, write_json


@dataclass(frozen=True)
class Check:
    """One GX expectation by class name in `gx.expectations`, with its keyword arguments."""

    expectation: str
    kwargs: dict


def prompt_checks(max_length: int, max_duplicate_share: float) -> list[Check]:
    return [
        Check("ExpectColumnValuesToNotBeNull", {"column": "prompt"}),
        Check("ExpectColumnValueLengthsToBeBetween", {"column": "prompt", "min_value": 1, "max_value": max_length}),
        Check("ExpectColumnValuesToMatchRegex", {"column": "prompt", "regex": r"\S"}),
        Check("ExpectColumnValuesToNotBeNull", {"column": "id"}),
        Check("ExpectColumnValuesToBeUnique", {"column": "id"}),
        Check(
            "ExpectColumnProportionOfUniqueValuesToBeBetween",
            {"column": "prompt", "min_value": 1 - max_duplicate_share},
        ),
    ]


def image_frame(images: torch.Tensor, captions: pd.DataFrame) -> pd.DataFrame:
    """One row per image: id, label, shape, dtype, value range, NaN count."""
    x = images.float()
    n = len(images)
    return pd.DataFrame(
        {
            "id": captions["id"].to_numpy(),
            "label": captions["label"].to_numpy(),
            "channels": [images.shape[1]] * n,
            "height": [images.shape[2]] * n,
            "width": [images.shape[3]] * n,
            "dtype": [str(images.dtype).removeprefix("torch.")] * n,
            "min": x.amin((1, 2, 3)).numpy(),
            "max": x.amax((1, 2, 3)).numpy(),
            "nan_count": torch.isnan(x).sum((1, 2, 3)).numpy(),
        }
    )


def image_checks(resolution: int, classes: list[int] | None) -> list[Check]:
    checks = [
        Check("ExpectColumnValuesToBeInSet", {"column": "height", "value_set": [resolution]}),
        Check("ExpectColumnValuesToBeInSet", {"column": "width", "value_set": [resolution]}),
        Check("ExpectColumnValuesToBeInSet", {"column": "channels", "value_set": [1, 3]}),
        Check("ExpectColumnValuesToBeInSet", {"column": "dtype", "value_set": ["uint8"]}),
        Check("ExpectColumnValuesToBeBetween", {"column": "min", "min_value": 0, "max_value": 255}),
        Check("ExpectColumnValuesToBeBetween", {"column": "max", "min_value": 0, "max_value": 255}),
        Check("ExpectColumnValuesToBeInSet", {"column": "nan_count", "value_set": [0]}),
    ]
    if classes:
        checks.append(Check("ExpectColumnDistinctValuesToContainSet", {"column": "label", "value_set": classes}))
    return checks


def latent_frame(
    latents: torch.Tensor, records: pd.DataFrame, expected_shape: tuple[int, ...] | None = None
) -> pd.DataFrame:
    """One row per latent: id, finiteness, shape (and the shape its resolution bucket should have), per-channel
    mean and std."""
    x = latents.float()
    shape = "x".join(map(str, latents.shape[1:]))
    frame = {
        "id": (records["id"].astype(str) + "#" + records["sample"].astype(str)).to_numpy(),
        "finite": torch.isfinite(x).flatten(1).all(1).numpy(),
        "shape": [shape] * len(latents),
        "expected_shape": ["x".join(map(str, expected_shape or latents.shape[1:]))] * len(latents),
    }
    finite = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    for c in range(latents.shape[1]):
        frame[f"mean_c{c}"] = finite[:, c].mean((1, 2)).numpy()
        frame[f"std_c{c}"] = finite[:, c].std((1, 2)).numpy()
    return pd.DataFrame(frame)


def latent_checks(count: int, channel_mean: list[float], channel_std: list[float], tolerance: float) -> list[Check]:
    """Count, finiteness, every latent shaped as its resolution bucket says; the set's per-channel mean/std
    within `tolerance` of the teacher VAE's statistics on real images (in the scaled space the transformer sees)."""
    checks = [
        Check("ExpectTableRowCountToEqual", {"value": count}),
        Check("ExpectColumnValuesToBeInSet", {"column": "finite", "value_set": [True]}),
        Check("ExpectColumnPairValuesToBeEqual", {"column_A": "shape", "column_B": "expected_shape"}),
    ]
    for c, (mu, sd) in enumerate(zip(channel_mean, channel_std)):
        checks.append(
            Check(
                "ExpectColumnMeanToBeBetween",
                {"column": f"mean_c{c}", "min_value": mu - tolerance, "max_value": mu + tolerance},
            )
        )
        checks.append(
            Check(
                "ExpectColumnMeanToBeBetween",
                {"column": f"std_c{c}", "min_value": sd * (1 - tolerance), "max_value": sd * (1 + tolerance)},
            )
        )
    return checks


def _describe(result, frame: pd.DataFrame) -> dict:
    cfg = result.expectation_config
    kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id",)}
    details = result.result or {}
    rows = details.get("unexpected_index_list") or []
    ids = (
        [str(frame["id"].iloc[i]) for i in rows[:20]]
        if "id" in frame and rows and isinstance(rows[0], (int, np.integer))
        else []
    )
    return {
        "expectation": cfg.type,
        "column": kwargs.get("column"),
        "kwargs": kwargs,
        "success": bool(result.success),
        "observed": details.get("observed_value"),
        "unexpected_count": details.get("unexpected_count"),
        "unexpected_values": [str(v) for v in (details.get("partial_unexpected_list") or [])[:10]],
        "records": ids,
    }


def run_suite(name: str, frame: pd.DataFrame, checks: list[Check], report_dir: str | Path) -> dict:
    """Validate `frame`; always write reports/validation/<name>.{json,md}; raise on failure."""
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    batch = (
        context.data_sources.add_pandas(f"ladd_{name}")
        .add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe("all")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=name))
    for check in checks:
        suite.add_expectation(getattr(gx.expectations, check.expectation)(**check.kwargs))
    definition = context.validation_definitions.add(gx.ValidationDefinition(data=batch, suite=suite, name=name))
    result = definition.run(batch_parameters={"dataframe": frame}, result_format="COMPLETE")
    outcomes = [_describe(r, frame) for r in result.results]
    report = {"suite": name, "success": bool(result.success), "rows": len(frame), "results": outcomes}
    report_dir = Path(report_dir)
    write_json(report_dir / f"{name}.json", report)
    lines = [
        f"# Validation: {name} — {'passed' if report['success'] else 'FAILED'} ({len(frame)} rows)",
        "",
        "| expectation | column | result | unexpected | records |",
        "|---|---|---|---|---|",
    ]
    for o in outcomes:
        lines.append(
            f"| {o['expectation']} | {o['column'] or ''} | {'ok' if o['success'] else 'FAILED'} | "
            f"{o['unexpected_count'] if o['unexpected_count'] is not None else o['observed']} | "
            f"{', '.join(o['records'][:5])} |"
        )
    with atomic_file(report_dir / f"{name}.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    failed = [o for o in outcomes if not o["success"]]
    if failed:
        msg = "; ".join(
            f"{o['expectation']} on column {o['column']!r}"
            + (
                f" failed for records {o['records'][:5]}"
                if o["records"]
                else f" failed (observed {json.dumps(o['observed'], default=str)})"
            )
            for o in failed
        )
        raise ValidationFailed(f"suite {name!r} failed: {msg} (report: {report_dir / (name + '.md')})")
    return report


def validate_data(
    data_dir: str | Path,
    resolution: int,
    classes: int,
    max_prompt_length: int,
    max_duplicate_share: float,
    report_dir: str | Path,
) -> dict:
    """Prompt suite on every split's captions; image suite where a split has images."""

    reports, failures = {}, []

    def suite(name, frame, checks):  # every suite runs: one run reports every problem
        try:
            reports[name] = run_suite(name, frame, checks, report_dir)["success"]
        except ValidationFailed as e:
            reports[name] = False
            failures.append(str(e))

    for split_name in SPLITS:
        if split_name == "val" and not (Path(data_dir) / "val").is_dir():  # prepare.val_fraction: 0
            continue
        split = load_split(Path(data_dir) / split_name)
        suite(f"prompts_{split_name}", split.captions, prompt_checks(max_prompt_length, max_duplicate_share))
        if split.images is not None:
            wanted = list(range(classes)) if classes and split_name == "train" else None
            suite(f"images_{split_name}", image_frame(split.images, split.captions), image_checks(resolution, wanted))
    for stale in Path(report_dir).glob("*"):  # reports of suites this data set no longer has
        if stale.suffix in (".json", ".md") and stale.stem not in reports:
            stale.unlink()
    if failures:
        raise ValidationFailed(f"{len(failures)} of {len(reports)} suites failed: " + "; ".join(failures))
    return reports


def real_latent_stats(teacher_dir: str | Path, data_dir: str | Path) -> tuple[list[float], list[float]]:
    """Per-channel mean of per-image latent means/stds of the real train images under the teacher's VAE
    (scaled space); (0, 1) per channel when the data set has no images (SD3's shift/scale normalise)."""
    from diffusers import AutoencoderKL

    from ladd.pipeline import component_config, encode_images

    images = load_split(Path(data_dir) / "train").images
    config = component_config(teacher_dir, "transformer")
    channels = config.get("out_channels") or config["in_channels"]
    if images is None:  # no VAE to load (nor the text encoders a pipeline would bring)
        return [0.0] * channels, [1.0] * channels
    z = encode_images(AutoencoderKL.from_pretrained(Path(teacher_dir) / "vae"), images)
    return z.mean((2, 3)).mean(0).tolist(), z.std((2, 3)).mean(0).tolist()


def validate_synthetic(
    synthetic_dir: str | Path,
    teacher_dir: str | Path,
    data_dir: str | Path,
    expected_count: int,
    tolerance: float,
    report_dir: str | Path,
) -> dict:

    mean, std = real_latent_stats(teacher_dir, data_dir)
    manifest = json.loads((Path(synthetic_dir) / "manifest.json").read_text())
    records = pd.read_parquet(Path(synthetic_dir) / "records.parquet", columns=["id", "sample"])
    frame = pd.concat(
        [
            latent_frame(
                shard["latents"], records.iloc[shard["record"].numpy()], tuple(manifest["buckets"][b]["latent_shape"])
            )
            for b, shard in iter_shards(synthetic_dir)
        ],
        ignore_index=True,
    )  # a shard in memory at a time
    checks = latent_checks(expected_count, mean, std, tolerance)
    return {"synthetic": run_suite("synthetic", frame, checks, report_dir)["success"]}
