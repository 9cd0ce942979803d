"""Serving the student: the request rules (`ladd.serving`), the registered model served by a real `mlflow models
serve` from a copy outside the repository in a virtual environment MLflow builds itself, `ladd generate` on the ONNX
export, and the model card's snippet."""

import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ladd.serving import MAX_SEED, RequestError, check_request

RULES = {"trained_steps": [1, 2, 4], "default_steps": 4, "max_prompts": 4, "max_prompt_chars": 50}


def test_a_prompt_alone_gets_the_default_steps_and_a_fresh_seed():
    first, second = check_request(["a seven"], **RULES), check_request(["a seven"], **RULES)
    assert first.steps == 4 and 0 <= first.seeds[0] <= MAX_SEED and first.seeds != second.seeds
    assert check_request(["a", "b"], 2, [5, float("nan")], **RULES).seeds[0] == 5  # a missing seed: fresh


@pytest.mark.parametrize(
    "prompts, steps, seeds, field",
    [
        ([], None, None, r"^prompt: at least one"),
        (["a"] * 5, None, None, r"^prompt: 5 prompts in one request; this model serves at most 4"),
        (["a", 7], None, None, r"^prompt\[1\]: must be a string, got int"),
        (["a" * 51], None, None, r"^prompt\[0\]: 51 characters; this model serves at most 50"),
        (["a"], 3, None, r"^steps: 3 is not one of the student's trained step counts \[1, 2, 4\]"),
        (["a"], 1_000_000, None, r"^steps: 1000000 is not one"),
        (["a"], 2.5, None, r"^steps: 2.5 is not one"),
        (["a"], True, None, r"^steps: True is not one"),
        (["a"], None, [-1], r"^seed\[0\]: -1 is not an integer in \[0, 4294967295\]"),
        (["a"], None, [2**40], r"^seed\[0\]: 1099511627776 is not an integer"),
        (["a", "b"], None, [1], r"^seed: 1 seeds for 2 prompts"),
    ],
)
def test_bad_requests_are_refused_naming_the_field(prompts, steps, seeds, field):
    with pytest.raises(RequestError, match=field):
        check_request(prompts, steps, seeds, **RULES)


def test_the_card_snippet_gives_the_same_images_twice(tiny_student_dir):
    """The model card's code, run as a user runs it (stock diffusers, the student's re-noising scheduler), twice at
    the student's default 4 steps: the same image."""
    card = (tiny_student_dir / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace("path/to/student", str(tiny_student_dir))
    assert "torch.manual_seed(0)" in snippet and "num_inference_steps=4" in snippet
    images = []
    for _ in range(2):
        scope: dict = {}
        exec(snippet, scope)
        images.append(np.asarray(scope["image"]))
    np.testing.assert_array_equal(images[0], images[1])


# --- the registered model, served -------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body, timeout: float = 120) -> tuple[int, dict, float]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/invocations", data, {"Content-Type": "application/json"})
    tick = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), time.perf_counter() - tick
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), time.perf_counter() - tick


def _image(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


@pytest.fixture(scope="module")
def served(tiny_student_dir, tmp_path_factory):
    """The student logged as the evaluate stage logs it (limits: 4 prompts of at most 200 characters), copied out of
    the store into a folder of its own and served by `mlflow models serve` with MLflow's default environment
    manager (virtualenv: a new environment from the model's requirements.txt, which names no ladd) from that folder."""
    from ladd.registry import open_registry
    from ladd.tracking import stage_run

    root = tmp_path_factory.mktemp("served")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    try:
        with stage_run("evaluate", model_config={"max_prompts": 4, "max_prompt_chars": 200}) as tracker:
            info = open_registry(tracker).log_served("student", tiny_student_dir)
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    model = next(root.rglob(f"models/{info.model_id}/artifacts"))
    copy = shutil.copytree(model, root / "elsewhere" / "student-model")
    requirements = (copy / "requirements.txt").read_text()
    assert "ladd" not in requirements.replace("mlflow", "") and "torch==" in requirements
    port = _free_port()
    # a shell of its own: no project on the path, no MLflow run or store of this process
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("MLFLOW_")
    }
    log = open(root / "serve.log", "w")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "models",
            "serve",
            "-m",
            str(copy),
            "--env-manager",
            "virtualenv",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=copy.parent,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900  # the first run builds the environment (pip, from the package index)
    while True:
        try:
            urllib.request.urlopen(f"{url}/ping", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"mlflow models serve did not come up:\n{(root / 'serve.log').read_text()[-3000:]}")
            time.sleep(1)
    yield url, copy
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    subprocess.run(["pkill", "-f", f"--port {port}"], check=False)  # uvicorn, under the env's own shell


@pytest.mark.slow
def test_the_served_model_answers_prompts_and_refuses_bad_requests(served):
    url, copy = served
    status, body, _ = _post(url, {"dataframe_records": [{"prompt": "a handwritten digit seven"}]})
    assert status == 200
    (row,) = body["predictions"]
    assert row["steps"] == 4 and 0 <= row["seed"] <= MAX_SEED and _image(row["image_png"]).shape == (32, 32)

    bad = {  # each a 4xx naming the field, answered before any model work
        "steps": {"dataframe_records": [{"prompt": "a seven", "steps": 1_000_000}]},
        "prompt: 5 prompts": {"dataframe_records": [{"prompt": f"digit {i}"} for i in range(5)]},
        "prompt[0]: 201 characters": {"dataframe_records": [{"prompt": "a" * 201}]},
        "prompt[0]: must be a string": {"dataframe_records": [{"prompt": 5}]},
        "seed[0]: -1": {"dataframe_records": [{"prompt": "a seven", "seed": -1}]},
        "seed[0]: 99999999999": {"dataframe_records": [{"prompt": "a seven", "seed": 99_999_999_999}]},
        "prompt": {"dataframe_records": []},
        "JSON": b'{"dataframe_records": [{"prompt',
    }
    for field, body in bad.items():
        status, answer, seconds = _post(url, body)
        assert 400 <= status < 500 and field in answer["message"] and seconds < 1.0, (field, status, answer, seconds)

    status, body, _ = _post(
        url, {"dataframe_split": {"columns": ["prompt", "steps", "seed"], "data": [["a seven", 2, 11]]}}
    )
    assert status == 200 and body["predictions"][0]["seed"] == 11  # still serving


@pytest.mark.slow
def test_the_served_image_equals_ladd_generates(served, exported, tmp_path):
    """The served PyTorch student and `ladd generate` on the ONNX export draw the same noise from a seed: the same
    image (to the export's parity: at most one grey level apart)."""
    url, _ = served
    onnx_dir = exported[0].out_dir
    ladd = Path(sys.executable).parent / "ladd"
    for steps in (1, 2, 4):
        out = subprocess.run(
            [
                str(ladd),
                "generate",
                "--onnx",
                onnx_dir,
                "--prompt",
                "handwritten three",
                "--seed",
                "7",
                "--steps",
                str(steps),
                "--provider",
                "cpu",
                "--out",
                str(tmp_path / f"s{steps}"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        path, seed, _ = out.stdout.strip().split("\t")
        assert seed == "seed 7"
        status, body, _ = _post(
            url, {"dataframe_records": [{"prompt": "handwritten three", "steps": steps, "seed": 7}]}
        )
        served_image = _image(body["predictions"][0]["image_png"]).astype(int)
        generated = np.asarray(Image.open(path)).astype(int)
        assert np.abs(served_image - generated).max() <= 1, steps

    refused = subprocess.run(
        [str(ladd), "generate", "--onnx", onnx_dir, "--prompt", "x", "--steps", "3"], capture_output=True, text=True
    )
    assert (
        refused.returncode == 2
        and "steps: 3 is not one of the student's trained step counts [1, 2, 4]" in refused.stderr
    )
