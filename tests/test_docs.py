"""The documentation: the generated params reference covers every key and every config field, README stays short,
and the MkDocs site builds in strict mode without a warning."""

import dataclasses
import importlib.util
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HOOK = ROOT / "docs" / "hooks" / "params_reference.py"


def _hook():
    spec = importlib.util.spec_from_file_location("params_reference_hook", HOOK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _keys(tree, prefix=""):
    """Every dotted key of a params file's nested mappings (a list is a value, not a subtree)."""
    for key, value in (tree or {}).items():
        yield f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _keys(value, f"{prefix}{key}.")


def _fields(cls, prefix):
    """Every dotted key a config dataclass backs, nested dataclasses (also `X | None`) expanded."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield f"{prefix}.{f.name}"
        inner = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            yield from _fields(inner[0], f"{prefix}.{f.name}")


@pytest.fixture(scope="module")
def reference():
    hook = _hook()
    return hook, hook.params_reference_markdown(ROOT)


@pytest.mark.parametrize("params_file", ["params.yaml", "params.inpaint.yaml"])
def test_reference_covers_every_key_of_the_params_files(reference, params_file):
    hook, markdown = reference
    keys = list(_keys(yaml.safe_load((ROOT / params_file).read_text())))
    sections = {key for key in keys if "." not in key}
    assert sections == {name for name, _ in hook.sections(ROOT)}, "a section of the file that Params does not read"
    missing = [key for key in keys if "." in key and f"| `{key}` |" not in markdown]
    assert not missing, f"{params_file} keys missing from the generated reference: {missing}"
    assert {key for key in keys if "." in key} <= hook.reference_keys(ROOT)


def test_reference_covers_every_config_field(reference):
    hook, markdown = reference
    fields = [key for name, cls in hook.sections(ROOT) for key in _fields(cls, name)]
    assert len(fields) > 150  # every section, not an empty walk
    missing = [key for key in fields if f"| `{key}` |" not in markdown]
    assert not missing, f"config fields missing from the generated reference: {missing}"
    assert set(fields) == hook.reference_keys(ROOT)


def test_reference_descriptions_come_from_the_source(reference):
    _, markdown = reference
    row = next(line for line in markdown.splitlines() if line.startswith("| `prepare.source` |"))
    assert "digits \\| folder \\| prompts" in row  # the trailing comment of the field in ladd/config.py
    row = next(line for line in markdown.splitlines() if line.startswith("| `distill.lr_g` |"))
    assert "`3e-05`" in row and "`0.0001`" in row  # the code's default beside params.yaml's value


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail into docs/"
    head = "\n".join(lines[:10])
    assert "make run" in head and "make test" in head


def test_site_builds_strictly_without_warnings(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[dev]')")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    notes = [line for line in output.splitlines() if "not included in the" in line or "link" in line.lower()]
    assert not notes, notes  # pages outside the nav and unrecognised links are INFO lines, not warnings
    assert (tmp_path / "site" / "reference" / "params" / "index.html").is_file()
