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
    assert (
        json.loads((tmp_path / "memory.json").read_text())["models"]["SD3.5-large"]["params"]
        == models["SD3.5-large"]["params"]
    )
    assert "| SD3.5-large | fp32 student+EMA, bf16 teacher |" in capsys.readouterr().out


def test_lora_rows_count_what_peft_adds_and_fit_sd35_large_in_24_gb(tmp_path):

    from diffusers import SD3Transformer2DModel

    from ladd.lora import LoraSpec, add_student_adapter, count, target_suffixes

    bench = load()
    tiny = dict(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=3,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=48,
        pos_embed_max_size=16,
        qk_norm="rms_norm",
        dual_attention_layers=(0, 1),
    )
    for targets in bench.LORA_TARGETS.values():
        model = SD3Transformer2DModel(**tiny)
        weights, _ = add_student_adapter(model, LoraSpec(8, 8, 0.0, tuple(target_suffixes(model, targets))))
        assert count(weights) == bench.lora_params(tiny, 8, targets) > 0  # the benchmark's count is peft's
    out = bench.main(["--json", str(tmp_path / "memory.json")])["models"]
    large = out["SD3.5-large"]["lora"]
    # the target: SD3.5-large as a LoRA student within 24 GB static (attention at rank 256, every group at 64)
    assert large["attention/r256"]["total_gpu"] <= 24 and large["all/r64"]["total_gpu"] <= 24
    assert large["all/r256"]["total_gpu"] > 24 and not large["all/r256"]["fits_24"]
    assert large["attention/r64"]["total_gpu"] < large["attention/r256"]["total_gpu"] < large["all/r256"]["total_gpu"]
    # one bf16 base copy: far below the full student's static memory in its recommended setting
    assert large["all/r64"]["base"] == pytest.approx(
        (out["SD3.5-large"]["params"] + out["SD3.5-large"]["buffers"]) * 2 / 1e9
    )
    assert (
        out["SD3.5-medium"]["lora"]["all/r64"]["total_gpu"]
        < out["SD3.5-medium"]["settings"]["bf16-teacher"]["total_gpu"] / 4
    )


def test_the_plan_counts_the_data_and_a_lora_sd35_large_still_fits_24_gb(tmp_path, capsys):
    out = load().main(["--json", str(tmp_path / "memory.json")])["models"]
    data = out["SD3.5-large"]["data"]
    assert data["prompt_mb"] == pytest.approx((333 * 4096 + 2048) * 2 / 1e6)  # [77 + 256, 4096] + pooled, bf16
    assert data["record_mb"] == pytest.approx(4 * 16 * 128 * 128 * 2 / 1e6)  # x0 and 3 path states at 1024²
    assert data["disk_embeddings"] == pytest.approx(100_000 * data["prompt_mb"] / 1e3)
    assert data["gpu_per_rank"] < 0.1 and data["host_per_rank"] < 1  # O(batch), and a few int columns per record
    assert out["SD3.5-large"]["lora"]["all/r64"]["total_gpu"] + data["gpu_per_rank"] <= 24
    assert "| SD3.5-large | LoRA r64, every group | 839 | 273 |" in capsys.readouterr().out
