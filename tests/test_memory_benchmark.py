"""benchmarks/memory.py: real SD3-family configs built on meta give the published sizes, and the static
memory model puts SD3.5-large over one 80 GB GPU and SD3.5-medium under it in the recommended setting."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"


def load():
    spec = importlib.util.spec_from_file_location("benchmark_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_memory_benchmark(tmp_path, capsys):
    out = load().main(["--json", str(tmp_path / "memory.json")])
    models = out["models"]
    for name, params in (("SD3-medium", 2.03e9), ("SD3.5-medium", 2.24e9), ("SD3.5-large", 8.06e9)):
        assert models[name]["params"] == pytest.approx(params, rel=0.03)
    # SD3.5-medium's 384² positional table is a ~0.9 GB fp32 buffer per model copy
    assert models["SD3.5-medium"]["buffers"] * 4 / 1e9 == pytest.approx(0.91, abs=0.01)
    recommended = {name: m["settings"]["bf16-teacher"] for name, m in models.items()}
    assert recommended["SD3.5-large"]["total_gpu"] > 80 and not recommended["SD3.5-large"]["fits"]
    assert recommended["SD3.5-medium"]["total_gpu"] < 80 and recommended["SD3.5-medium"]["fits"]
    assert json.loads((tmp_path / "memory.json").read_text())["models"]["SD3.5-large"]["params"] == models["SD3.5-large"]["params"]
    assert "| SD3.5-large | fp32 student+EMA, bf16 teacher |" in capsys.readouterr().out
