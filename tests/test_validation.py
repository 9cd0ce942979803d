"""Great Expectations suites catch each planted bad input, name it, and leave outputs untouched."""

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
from conftest import write_params

from ladd.data.prepare import load_split, write_split
from ladd.data.validation import image_checks, image_frame, latent_checks, latent_frame, prompt_checks, run_suite
from ladd.errors import ValidationFailed
from ladd.io import fingerprint


@pytest.fixture(scope="module")
def train(prepared_data):
    return load_split(prepared_data / "train")


def test_clean_data_passes(train, tmp_path):
    report = run_suite("prompts", train.captions, prompt_checks(300, 0.99), tmp_path)
    assert report["success"] and (tmp_path / "prompts.md").is_file()
    assert run_suite("images", image_frame(train.images, train.captions), image_checks(32, list(range(10))), tmp_path)[
        "success"
    ]


def test_empty_prompt(train, tmp_path):
    captions = train.captions.copy()
    captions.loc[5, "prompt"] = ""
    with pytest.raises(
        ValidationFailed,
        match=rf"expect_column_value_lengths_to_be_between on column 'prompt' failed for records "
        rf"\['{captions['id'][5]}'\]",
    ):
        run_suite("prompts", captions, prompt_checks(300, 0.99), tmp_path)
    report = json.loads((tmp_path / "prompts.json").read_text())
    assert not report["success"]


def test_duplicated_id(train, tmp_path):
    captions = train.captions.copy()
    captions.loc[7, "id"] = captions.loc[3, "id"]
    with pytest.raises(ValidationFailed, match=r"expect_column_values_to_be_unique on column 'id'") as err:
        run_suite("prompts", captions, prompt_checks(300, 0.99), tmp_path)
    assert captions.loc[3, "id"] in str(err.value)


def test_duplicate_share_is_bounded(tmp_path):
    captions = pd.DataFrame(
        {"id": [f"r{i}" for i in range(10)], "prompt": ["same"] * 9 + ["other"], "label": [-1] * 10}
    )
    with pytest.raises(ValidationFailed, match="expect_column_proportion_of_unique_values_to_be_between"):
        run_suite("prompts", captions, prompt_checks(300, 0.5), tmp_path)


def test_wrong_image_shape(train, tmp_path):
    small = torch.nn.functional.interpolate(train.images[:50].float(), size=(16, 16)).to(torch.uint8)
    with pytest.raises(ValidationFailed, match="expect_column_values_to_be_in_set on column 'height'"):
        run_suite("images", image_frame(small, train.captions[:50]), image_checks(32, None), tmp_path)


def test_missing_class(train, tmp_path):
    keep = (train.labels != 7).numpy()
    frame = image_frame(train.images[keep], train.captions[keep].reset_index(drop=True))
    with pytest.raises(ValidationFailed, match="expect_column_distinct_values_to_contain_set on column 'label'"):
        run_suite("images", frame, image_checks(32, list(range(10))), tmp_path)


def test_nan_latent(tmp_path):
    latents = torch.randn(20, 4, 8, 8)
    latents[13, 2, 1, 1] = float("nan")
    records = pd.DataFrame({"id": [f"p{i}" for i in range(20)], "sample": [0] * 20})
    checks = latent_checks(20, [0.0] * 4, [1.0] * 4, 0.5)
    with pytest.raises(
        ValidationFailed, match=r"expect_column_values_to_be_in_set on column 'finite' failed for records \['p13#0'\]"
    ):
        run_suite("synthetic", latent_frame(latents, records), checks, tmp_path)
    ok = latent_frame(torch.nan_to_num(latents), records)
    assert run_suite("synthetic", ok, checks, tmp_path)["success"]
    with pytest.raises(ValidationFailed, match="expect_table_row_count_to_equal"):
        run_suite("synthetic", ok, latent_checks(40, [0.0] * 4, [1.0] * 4, 0.5), tmp_path)
    with pytest.raises(ValidationFailed, match="expect_column_mean_to_be_between on column 'mean_c0'"):
        run_suite("synthetic", latent_frame(latents.nan_to_num() + 3, records), checks, tmp_path)
    # a latent whose shape is not its resolution bucket's
    with pytest.raises(ValidationFailed, match="expect_column_pair_values_to_be_equal"):
        run_suite("synthetic", latent_frame(torch.nan_to_num(latents), records, (4, 8, 16)), checks, tmp_path)


def test_cli_validate_fails_and_leaves_data_untouched(prepared_data, tmp_path):
    data = tmp_path / "prepared"
    for split in ("train", "test"):
        s = load_split(prepared_data / split)
        s.captions.loc[0, "prompt"] = " "  # a fault in each split: one run reports both
        write_split(data / split, s)
    before = fingerprint(data)
    (tmp_path / "reports" / "data").mkdir(parents=True)
    (tmp_path / "reports" / "data" / "images_holdout.md").write_text("# Validation: images_holdout — passed")
    params = write_params(
        tmp_path / "params.yaml",
        {"prepare": {"out_dir": str(data)}, "validate": {"report_dir": str(tmp_path / "reports")}},
    )
    proc = subprocess.run(
        [sys.executable, "-m", "ladd.cli", "validate", "--params", str(params), "--no-tracking"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 3  # data failed validation
    assert "expect_column_values_to_match_regex on column 'prompt' failed for records ['digits-" in proc.stderr
    assert (
        "2 of 4 suites failed: suite 'prompts_train' failed" in proc.stderr
        and "suite 'prompts_test' failed" in proc.stderr
    )
    assert fingerprint(data) == before
    assert "FAILED" in (tmp_path / "reports" / "data" / "prompts_train.md").read_text()
    assert "FAILED" in (tmp_path / "reports" / "data" / "prompts_test.md").read_text()
    assert not (tmp_path / "reports" / "data" / "images_holdout.md").exists()  # no stale "passed" report beside them
