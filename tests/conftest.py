import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Smoke config: the project's params.yaml with every stage made short; each stage still runs for real.
# Shared by the e2e, DVC and Prefect tests.
SMOKE_OVERRIDES = {
    "classifier": {"steps": 60, "batch_size": 64},
    "teacher": {"vae_steps": 15, "steps": 20, "batch_size": 32},
    "synthesize": {"steps": 2, "samples_per_prompt": 1, "batch_size": 512},
    "distill": {"steps": 4, "batch_size": 4, "warmup_steps": 2, "checkpoint_every": 2, "log_every": 1},
    "evaluate": {"teacher_steps": 4, "few_steps": [1, 4], "num_samples": 24, "grid_size": 10},
    # fp16 graphs are tested in test_export.py and the GPU check's dry run; the stage-graph tests skip them
    "export": {"batch_sizes": [1, 3], "latency_repeats": 2, "fp16": False},
}
SMOKE_PARAMS = {
    section: {**values, **SMOKE_OVERRIDES.get(section, {})}
    for section, values in yaml.safe_load((ROOT / "params.yaml").read_text()).items()
}


@pytest.fixture(autouse=True, scope="session")
def _session_env(tmp_path_factory):
    torch.set_num_threads(2)
    os.environ.setdefault("LADD_TRACKING", "0")
    home = tmp_path_factory.mktemp("prefect_home")
    os.environ["PREFECT_HOME"] = str(home)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ["PATH"] = f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture
def smoke_project(tmp_path):
    """A copy of the project's pipeline files in a temp dir, with the smoke params."""
    for name in ("dvc.yaml",):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "ladd", tmp_path / "ladd", ignore=shutil.ignore_patterns("__pycache__"))
    write_params(tmp_path / "params.yaml", SMOKE_PARAMS)
    return tmp_path


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> Path:
    from ladd.config import PrepareConfig
    from ladd.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare(PrepareConfig(out_dir=str(out)))
    return out


@pytest.fixture(scope="session")
def tiny_teacher_dir(prepared_data, tmp_path_factory) -> Path:
    """A tiny teacher trained for a few steps: real components, real save_pretrained folder."""
    from ladd.config import TeacherConfig
    from ladd.teacher import teacher_stage
    from ladd.tracking import NullTracker

    out = tmp_path_factory.mktemp("models") / "teacher"
    cfg = TeacherConfig(out_dir=str(out), vae_steps=10, steps=10, batch_size=16, device="cpu")
    return teacher_stage(cfg, prepared_data, "cpu", NullTracker())


@pytest.fixture(scope="session")
def tiny_synthetic(tiny_teacher_dir, prepared_data, tmp_path_factory):
    from ladd.config import SynthesizeConfig
    from ladd.synthesize import synthesize
    from ladd.tracking import NullTracker

    cfg = SynthesizeConfig(
        out_dir=str(tmp_path_factory.mktemp("syn") / "synthetic"),
        steps=3,
        samples_per_prompt=1,
        shard_size=512,
        batch_size=512,
        device="cpu",
    )
    synthesize(cfg, prepared_data, tiny_teacher_dir, NullTracker())
    return cfg


@pytest.fixture(scope="session")
def tiny_student_dir(tiny_teacher_dir, tiny_synthetic, tmp_path_factory) -> Path:
    from ladd.config import DistillConfig
    from ladd.distill import distill
    from ladd.tracking import NullTracker

    out = tmp_path_factory.mktemp("student")
    cfg = DistillConfig(
        out_dir=str(out / "student"),
        checkpoint=str(out / "ck.safetensors"),
        report_dir=str(out),
        steps=4,
        batch_size=4,
        warmup_steps=2,
        device="cpu",
    )
    distill(cfg, tiny_teacher_dir, tiny_synthetic.out_dir, NullTracker())
    return out / "student"


@pytest.fixture(scope="session")
def exported(tiny_student_dir, tmp_path_factory):
    """`ladd export` of the tiny student (fp32 and fp16 graphs, the single files): (ExportConfig, summary)."""
    from ladd.config import ExportConfig
    from ladd.export import export_stage
    from ladd.tracking import NullTracker

    out = tmp_path_factory.mktemp("export")
    cfg = ExportConfig(
        out_dir=str(out / "onnx"),
        single_file_dir=str(out / "single_file"),
        report=str(out / "export.json"),
        batch_sizes=(1, 3),
        latency_repeats=2,
    )
    return cfg, export_stage(cfg, tiny_student_dir, NullTracker())


@pytest.fixture(scope="session")
def tiny_classifier_dir(prepared_data, tmp_path_factory) -> Path:
    from ladd.classifier import classifier_stage
    from ladd.config import ClassifierConfig
    from ladd.tracking import NullTracker

    out = tmp_path_factory.mktemp("classifier") / "classifier"
    classifier_stage(
        ClassifierConfig(steps=40, batch_size=64, out_dir=str(out), device="cpu"), prepared_data, NullTracker()
    )
    return out


# A finished tiny project (test_faults, test_distributed): the distill settings that made its checkpoint.
DISTILL = dict(steps=4, batch_size=4, warmup_steps=2, checkpoint_every=2, log_every=1, device="cpu")
CHECKPOINT = "models/checkpoints/distill.safetensors"
RUN_REPORT = "reports/distill.json"  # how the last distill run went (distill.report_dir)


@pytest.fixture(scope="session")
def finished_project(prepared_data, tiny_teacher_dir, tiny_synthetic, tmp_path_factory) -> Path:
    """data/prepared, models/teacher, data/synthetic, models/student and its checkpoint, and the params.yaml
    that made them (paths relative to the project, as in the real one)."""
    from ladd.config import DistillConfig
    from ladd.distill import distill
    from ladd.tracking import NullTracker

    root = tmp_path_factory.mktemp("finished") / "project"
    shutil.copytree(prepared_data, root / "data" / "prepared")
    shutil.copytree(tiny_teacher_dir, root / "models" / "teacher")
    shutil.copytree(tiny_synthetic.out_dir, root / "data" / "synthetic")
    cfg = DistillConfig(
        out_dir=str(root / "models" / "student"),
        checkpoint=str(root / CHECKPOINT),
        report_dir=str(root / "reports"),
        **DISTILL,
    )
    distill(cfg, root / "models" / "teacher", root / "data" / "synthetic", NullTracker())
    params = {
        **SMOKE_PARAMS,
        "synthesize": {**asdict(replace(tiny_synthetic, out_dir="data/synthetic")), "device": "cpu"},
        "distill": {**asdict(replace(cfg, out_dir="models/student", checkpoint=CHECKPOINT, report_dir="reports"))},
    }
    params = json.loads(json.dumps(params))  # tuples as lists
    params["prepare"]["out_dir"], params["teacher"]["out_dir"] = "data/prepared", "models/teacher"
    write_params(root / "params.yaml", params)
    return root


def edit_params(project: Path, section: str, **values) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params.setdefault(section, {}).update(values)
    write_params(project / "params.yaml", params)


# --- real git + DVC in a temp directory ----------------------------------------------------------------------


def run(cmd, cwd):
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def init_repo(path):
    run(["git", "init", "-q"], path)
    run(["git", "-c", "user.email=ci@ladd", "-c", "user.name=ci", "commit", "-q", "--allow-empty", "-m", "init"], path)
    run([os.path.join(os.path.dirname(sys.executable), "dvc"), "init", "-q"], path)
    shutil.copy(ROOT / ".dvcignore", path / ".dvcignore")  # the project's: evaluate adds its table to the model card


def dvc(path, *args):
    return run([os.path.join(os.path.dirname(sys.executable), "dvc"), *args], path)


# --- a real MLflow server on 127.0.0.1 -------------------------------------------------------------------------------


def start_mlflow_server(root: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on a free port of 127.0.0.1 with its store under `root`; (process, URI) once it answers."""
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            return proc, uri
        except OSError:
            assert proc.poll() is None, "mlflow server exited"
            time.sleep(0.5)
    proc.kill()
    pytest.fail("mlflow server did not start in 120 s")
