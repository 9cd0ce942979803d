import subprocess
import sys

import pytest

from ladd.params import load_params
from ladd.errors import ConfigError
from conftest import ROOT, write_params


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
        ({"prepare": {"source": "folder", "images_dir": "/nope", "captions": "/nope.csv"}}, "prepare.images_dir: path does not exist: /nope"),
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
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "unknown key teacher.stepz" in proc.stderr and str(params) in proc.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
