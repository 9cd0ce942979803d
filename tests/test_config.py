import subprocess
import sys

import pytest
from conftest import ROOT, write_params

from ladd.errors import ConfigError
from ladd.params import load_params


def test_project_params_load():
    p = load_params(ROOT / "params.yaml")
    assert p.teacher.vae_channels == (16, 32, 32)
    assert p.prepare.source == "digits"


@pytest.mark.parametrize(
    "params, message",
    [
        ({"prepare": {"sourc": "digits"}}, "unknown key prepare.sourc"),
        ({"teacher": {"steps": "abc"}}, "teacher.steps: expected int, got str 'abc'"),
        ({"teacher": {"lr": True}}, "teacher.lr: expected float"),
        ({"teacher": {"vae_channels": [16, "x"]}}, "teacher.vae_channels[1]: expected int"),
        (
            {"prepare": {"source": "folder", "images_dir": "/nope", "captions": "/nope.csv"}},
            "prepare.images_dir: path does not exist: /nope",
        ),
        ({"prepare": {"source": "pictures"}}, "prepare.source must be one of"),
        ({"teachr": {}}, "unknown section 'teachr'"),
    ],
)
def test_bad_params_name_file_and_key(tmp_path, params, message):
    path = write_params(tmp_path / "bad.yaml", params)
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_ints_are_accepted_for_floats(tmp_path):
    p = load_params(write_params(tmp_path / "p.yaml", {"teacher": {"lr": 1}}))
    assert p.teacher.lr == 1.0 and isinstance(p.teacher.lr, float)


def test_cli_config_error_before_any_work(tmp_path):
    """A bad key in one section stops every stage at once and leaves outputs untouched."""
    out = tmp_path / "data" / "prepared"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("previous output")
    params = write_params(tmp_path / "params.yaml", {"prepare": {"out_dir": str(out)}, "teacher": {"stepz": 3}})
    proc = subprocess.run(
        [sys.executable, "-m", "ladd.cli", "prepare", "--params", str(params), "--no-tracking"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "unknown key teacher.stepz" in proc.stderr and str(params) in proc.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_frozen_heads_with_an_adversarial_loss_are_refused(tmp_path):
    """lr_d <= 0 leaves the heads at their random start while the student is trained against them."""
    for lr_d in (0, -1e-3):
        with pytest.raises(ConfigError) as err:
            load_params(write_params(tmp_path / "p.yaml", {"distill": {"lr_d": lr_d}}))
        assert "distill.lr_d" in str(err.value) and "distill.adversarial_weight" in str(err.value)
        assert "\n" not in str(err.value)
    assert load_params(write_params(tmp_path / "p.yaml", {"distill": {"lr_d": 0, "adversarial_weight": 0}}))


def test_features_auto_picks_the_extractor_the_data_allows():
    from ladd.config import resolve_features

    assert resolve_features("auto", True, "clip", "inception") == "classifier"
    assert resolve_features("auto", False, "clip", "inception") == "clip"
    assert resolve_features("auto", False, None, "inception") == "inception"
    assert resolve_features("inception", True, None, "x") == "inception"
    with pytest.raises(ConfigError, match=r"evaluate.clip_path .* or evaluate.inception_path"):
        resolve_features("auto", False, None, None)
