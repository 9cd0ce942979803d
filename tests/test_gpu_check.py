"""benchmarks/gpu_check.py --dry-run: the prepared GPU check runs its whole code path on tiny shapes on the CPU
(real distill runs for full and LoRA students, DDP over a one-rank process group, the export stage with fp32 and
fp16 graphs), so the script a GPU session runs once cannot rot."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_dry_run(tmp_path, capsys):
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--dry-run", "--out", str(tmp_path / "run"), "--json", str(tmp_path / "gpu.json")])
    rows = result["rows"]
    steps = [r for r in rows if r["check"] == "LADD step"]
    assert len(steps) == 4 and all(math.isfinite(r["step_s"]) and r["step_s"] > 0 for r in steps)
    full = {r["trained_params"] for r in steps if r["student"] == "full"}
    lora = {r["trained_params"] for r in steps if r["student"].startswith("LoRA")}
    assert len(full) == len(lora) == 1 and 0 < lora.pop() < full.pop()
    ddp = next(r for r in rows if r["check"].startswith("DDP"))
    assert ddp["grad_diff"] < 1e-6  # one rank: DDP's all-reduce leaves the gradient as it is
    ort = [r for r in rows if r["check"].startswith("ONNX Runtime fp32")]
    assert [r["batch"] for r in ort] == [1, 2] and result["export"]["max_abs_error"] < 1e-3
    half = [r for r in rows if r["check"].startswith("ONNX Runtime fp16")]
    assert [r["batch"] for r in half] == [1, 2] and all(r["latency_ms"] > 0 for r in half)
    assert json.loads((tmp_path / "gpu.json").read_text())["dry_run"] is True
    assert "| LADD step | LoRA r4 |" in capsys.readouterr().out
