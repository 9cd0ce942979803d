"""ONNX export of a tiny student, run through real onnxruntime sessions on the CPU."""

import base64
import io
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from conftest import ROOT
from PIL import Image

from ladd.config import ExportConfig
from ladd.errors import ParityError
from ladd.export import export_stage
from ladd.onnx_runtime import OnnxStudent, open_session
from ladd.pipeline import encode_prompts, load_pipeline, read_meta
from ladd.sampling import cfg_velocity, sample_renoise
from ladd.schedules import student_sigmas
from ladd.tracking import stage_run

pytestmark = pytest.mark.slow
PROMPTS = [
    "a handwritten digit seven",
    "handwritten three",
    "an image of the number 4",
    "a drawing of the digit two",
    "the number 1 written by hand and a very long tail that the CLIP tokenizer has to truncate away",
]


def test_report_and_graphs(exported):
    cfg, summary = exported
    report = json.loads(open(cfg.report).read())
    assert report["max_abs_error"] <= 1e-3 and report["provider"] == "CPUExecutionProvider"
    assert set(report["latency"]) == {"1", "3"}
    assert all(r["torch_ms"] > 0 and r["ort_ms"] > 0 for r in report["latency"].values())
    assert report["fp16"]["latents_max_abs_error"] < 0.1  # half precision runs, and is close
    manifest = json.loads(open(os.path.join(cfg.out_dir, "manifest.json")).read())
    assert set(manifest["models"]) == {"fp32", "fp16"}
    for files in manifest["models"].values():
        assert set(files) == {"text_encoder", "transformer", "vae_decoder", "generator"}
        for f in files.values():
            model = onnx.load(os.path.join(cfg.out_dir, f))
            onnx.checker.check_model(model, full_check=True)
            assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
            assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # batch is dynamic


def test_onnx_matches_the_library_sampler_at_another_batch_size(exported, tiny_student_dir):
    """The unrolled graph and the one-step loop equal ladd's own renoise sampler (the one `evaluate` scores),
    given the same noise, at a batch size the export never saw; the prompt path equals encode_prompt."""
    cfg, _ = exported
    pipe, meta = load_pipeline(tiny_student_dir), read_meta(tiny_student_dir)
    runtime = OnnxStudent(cfg.out_dir, provider="cpu")
    embeds, pooled = encode_prompts(pipe, PROMPTS, meta["max_sequence_length"])
    ort_embeds, ort_pooled = runtime.encode(PROMPTS)
    assert np.abs(ort_embeds - embeds.numpy()).max() < 1e-4 and np.abs(ort_pooled - pooled.numpy()).max() < 1e-4
    for steps in (4, 2):
        noise = torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(1))
        draws = torch.Generator().manual_seed(2)  # sample_renoise draws one noise per step, in order
        step_noise = torch.stack([torch.randn(noise.shape, generator=draws) for _ in range(steps)])[: steps - 1]
        expected = sample_renoise(
            cfg_velocity(pipe.transformer, embeds, pooled),
            noise,
            student_sigmas(steps, meta),
            generator=torch.Generator().manual_seed(2),
        )
        latents, images = runtime.generate_latents(
            embeds.numpy(), pooled.numpy(), noise.numpy(), step_noise.numpy(), steps
        )
        assert np.abs(latents - expected.numpy()).max() < 1e-4, steps
        assert images.shape == (len(PROMPTS), 1, 32, 32) and 0 <= images.min() and images.max() <= 1


def test_generate_without_torch(exported, tmp_path):
    """`ladd generate` and the runtime module never import PyTorch."""
    cfg, _ = exported
    code = (
        "import sys; from ladd.cli import main; from ladd.onnx_runtime import OnnxStudent\n"
        f"images = OnnxStudent({cfg.out_dir!r}, provider='cpu')(['a handwritten digit seven'] * 2, steps=1)\n"
        "assert images.shape == (2, 32, 32, 1) and images.dtype.name == 'uint8', images.shape\n"
        f"assert main(['generate', '--onnx', {cfg.out_dir!r}, '--prompt', 'handwritten three',"
        f" '--prompt', 'handwritten six/../../x', '--provider', 'cpu', '--out', {str(tmp_path)!r}]) == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # a prompt's `/` and `..` make no folders: every file lands in --out
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png")) == [
        "000_handwritten_three.png",
        "001_handwritten_six_x.png",
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without CUDA")
def test_cuda_missing_falls_back_to_cpu_with_a_warning(exported, monkeypatch, caplog):
    cfg, _ = exported
    monkeypatch.setattr("ladd.onnx_runtime._UNUSABLE", set())
    manifest = json.loads(open(os.path.join(cfg.out_dir, "manifest.json")).read())
    with caplog.at_level(logging.INFO, logger="ladd.onnx_runtime"):
        session = open_session(os.path.join(cfg.out_dir, manifest["models"]["fp32"]["vae_decoder"]), "cuda")
    assert session.get_providers() == ["CPUExecutionProvider"]
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning and "CUDAExecutionProvider is not usable" in warning[0] and "CPUExecutionProvider" in warning[0]
    assert any("on CPUExecutionProvider" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_failed_parity_keeps_previous_export_and_registers_nothing(exported, tiny_student_dir, tmp_path, monkeypatch):
    """A real MLflow store: a failing parity check raises, leaves the previous export and report as they were
    and registers nothing; a passing one registers the self-contained pyfunc model, whose images MLflow gives as
    the runtime does."""
    import mlflow
    from mlflow.tracking import MlflowClient

    previous, _ = exported
    out_dir, report = tmp_path / "onnx", tmp_path / "export.json"
    shutil.copytree(previous.out_dir, out_dir)
    report.write_text("{}")
    before = sorted(p.name for p in out_dir.rglob("*"))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    cfg = ExportConfig(
        out_dir=str(out_dir),
        single_file_dir=str(tmp_path / "single_file"),
        report=str(report),
        fp16=False,
        batch_sizes=(2,),
        latency_repeats=1,
    )
    with pytest.raises(ParityError, match="export.tolerance"), stage_run("export") as tracker:
        export_stage(ExportConfig(**{**cfg.__dict__, "tolerance": 1e-9}), tiny_student_dir, tracker)
    assert sorted(p.name for p in out_dir.rglob("*")) == before and report.read_text() == "{}"
    client = MlflowClient(store)
    assert client.search_registered_models() == []
    settings = '{"machines": {"some CPU x2 / onnxruntime 1 / CPUExecutionProvider": {"settings": {"threads": 1}}}}'
    (out_dir / "runtime_settings.json").write_text(settings)
    with stage_run("export") as tracker:
        export_stage(cfg, tiny_student_dir, tracker)
    assert (out_dir / "runtime_settings.json").read_text() == settings  # each machine's settings outlive a re-export
    (version,) = client.search_model_versions("name='ladd-student-onnx'")
    info = mlflow.models.get_model_info(f"models:/ladd-student-onnx/{version.version}")
    assert info.flavors["python_function"]["loader_module"] == "ladd.serving"
    model = mlflow.pyfunc.load_model(f"models:/ladd-student-onnx/{version.version}")
    out = model.predict(
        pd.DataFrame({"prompt": ["handwritten three", "handwritten six"], "seed": [0, 1], "steps": [2, 2]})
    )
    runtime = OnnxStudent(out_dir, provider="cpu")
    expected = runtime(["handwritten three", "handwritten six"], 2, [0, 1])
    for b64, image in zip(out["image_png"], expected):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))), image[..., 0])
    with pytest.raises(Exception, match=r"steps: 3 is not one of the student's trained step counts \[1, 2, 4\]"):
        model.predict(pd.DataFrame({"prompt": ["handwritten three"], "steps": [3]}))
    assert json.loads(report.read_text())["max_abs_error"] <= 1e-3


def test_runtime_settings_measured_on_this_machine_are_used(exported, tiny_student_dir, tmp_path):
    """benchmarks/onnx_latency.py measures the settings and writes the fastest under this machine's key;
    OnnxStudent opens its sessions with them (another machine's entry is ignored), with the same images."""
    import onnxruntime as ort

    from ladd.onnx_runtime import RUNTIME_SETTINGS, machine_key

    cfg, _ = exported
    onnx_dir = shutil.copytree(cfg.out_dir, tmp_path / "onnx")
    out = subprocess.run(
        [
            sys.executable,
            "benchmarks/onnx_latency.py",
            "--onnx",
            str(onnx_dir),
            "--student",
            str(tiny_student_dir),
            "--batch-sizes",
            "1",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--optimizations",
            "basic",
            "all",
            "--no-fp16",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert "chosen for" in out.stdout and "ORT / eager" in out.stdout
    held = json.loads((onnx_dir / RUNTIME_SETTINGS).read_text())["machines"]
    assert set(held[machine_key("cpu")]["measured"]) == {"1"}
    held[machine_key("cpu")]["settings"] = {"threads": 1, "optimization": "basic", "io_binding": True}
    held["another CPU x64 / onnxruntime 0 / CPUExecutionProvider"] = {"settings": {"threads": 7}}
    (onnx_dir / RUNTIME_SETTINGS).write_text(json.dumps({"machines": held}))
    tuned, plain = OnnxStudent(onnx_dir, provider="cpu"), OnnxStudent(cfg.out_dir, provider="cpu")
    assert tuned.settings == {"threads": 1, "optimization": "basic", "io_binding": True}
    options = tuned.session("generator").get_session_options()
    assert (
        options.intra_op_num_threads == 1
        and options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    )
    assert plain.settings == {"threads": 0, "optimization": "all", "io_binding": False}
    np.testing.assert_allclose(
        tuned(["handwritten six"], 4, [3]).astype(int), plain(["handwritten six"], 4, [3]).astype(int), atol=1
    )


def test_the_runtime_holds_requests_to_the_served_rules(exported, tiny_student_dir):
    """OnnxStudent (and so `ladd generate`) refuses what a served model refuses: steps the student did not train at,
    more prompts than the export's limit, a seed out of range; a prompt alone gets the default steps."""
    from ladd.schedules import trained_step_counts
    from ladd.serving import RequestError

    cfg, _ = exported
    runtime = OnnxStudent(cfg.out_dir, provider="cpu")
    assert runtime.meta["trained_steps"] == trained_step_counts(read_meta(tiny_student_dir)) == [1, 2, 4]
    assert runtime.request(["a seven"]).steps == read_meta(tiny_student_dir)["default_steps"]
    for kwargs, field in (({"steps": 3}, "steps: 3"), ({"seeds": [-5]}, r"seed\[0\]: -5")):
        with pytest.raises(RequestError, match=field):
            runtime(["a seven"], **kwargs)
    with pytest.raises(RequestError, match="prompt: 17 prompts in one request; this model serves at most 16"):
        runtime(["a seven"] * 17)
    assert runtime.request(["a seven"] * 17, max_prompts=32).steps == 4
