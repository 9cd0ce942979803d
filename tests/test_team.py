"""A team shares one project, with real git, DVC (a local remote) and the project's default MLflow store. One person
runs the Prefect flow over every stage (it leaves what `dvc repro` would) and pushes; another pulls and finds it up
to date; DVC experiments (in the workspace, `--temp`, and queued, two at once) rerun only the stages their change
touches, list their metrics in `dvc exp show`, and log to the project's own store, tagged with their names; the
same student evaluated under several protocols is one registered version."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, SMOKE_PARAMS, init_repo, write_params

pytestmark = pytest.mark.slow
BIN = os.path.dirname(sys.executable)
ALL_STAGES = {"prepare", "validate", "classifier", "teacher", "synthesize", "distill", "align", "evaluate", "export"}
HEADLINE = {
    "student.1.fd",
    "student.4.fd",
    "student.4.fd_teacher",
    "teacher.fd",
    "teacher.accuracy",
    "student.4.accuracy",
}


def sh(cmd: list[str], cwd, check: bool = True, **env) -> tuple[int, str] | str:
    """A command with tracking on and no MLFLOW_TRACKING_URI (every stage logs to the project's default store);
    its output through a file, not a pipe: the queue workers `dvc exp run --run-all` starts outlive it."""
    environ = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    environ |= {"PATH": f"{BIN}:{os.environ['PATH']}", "LADD_TRACKING": "1", **env}
    with tempfile.TemporaryFile("w+") as out:
        code = subprocess.run(cmd, cwd=cwd, env=environ, stdout=out, stderr=subprocess.STDOUT).returncode
        out.seek(0)
        text = out.read()
    if not check:
        return code, text
    assert code == 0, f"{cmd} failed in {cwd}:\n{text[-6000:]}"
    return text


def dvc(cwd, *args, **env) -> str:
    return sh([os.path.join(BIN, "dvc"), *args], cwd, **env)


def git(cwd, *args) -> str:
    return sh(["git", "-c", "user.email=ci@ladd", "-c", "user.name=ci", *args], cwd)


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def store_runs(project) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("ladd").experiment_id], max_results=1000)


def flat(metrics: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in metrics.items():
        out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


FLOW: dict = {}  # what the Prefect flow returned and left, for the flow's own test


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """One person's finished smoke project: the Prefect flow over every stage (tracked in the project's own store),
    a second flow run that finds nothing to do, then commit and `dvc push` to the project's remote."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline

    base = tmp_path_factory.mktemp("team")
    project = base / "alice"
    project.mkdir()
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "ladd", project / "ladd", ignore=shutil.ignore_patterns("__pycache__"))
    write_params(project / "params.yaml", SMOKE_PARAMS)
    init_repo(project)
    dvc(project, "remote", "add", "-d", "shared", str(base / "remote"))
    with pytest.MonkeyPatch.context() as env, prefect_test_harness(server_startup_timeout=120):
        env.setenv("LADD_TRACKING", "1")  # the real tracking path, every stage, into the project's default store
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
        FLOW["first"] = pipeline(str(project))
        FLOW["lock"] = (project / "dvc.lock").read_text()
        FLOW["second"] = pipeline(str(project))
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "a finished run")
    dvc(project, "push")
    yield base, project
    for pid in filter(str.isdigit, os.listdir("/proc")):  # DVC's queue workers run detached and may idle on after
        try:  # the queue is done: none outlives these tests
            if Path(os.readlink(f"/proc/{pid}/cwd")).is_relative_to(base):
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass


def test_the_flow_runs_every_stage_once_as_dvc_would(pushed):
    """One pipeline execution through the Prefect flow: it leaves dvc.lock exactly as `dvc repro` would (repro
    finds nothing to do), a second flow run skips every stage, one MLflow run holds each stage's nested run with
    the data sets DVC locked, and the student is registered as champion, its ONNX export beside it."""
    from mlflow.tracking import MlflowClient

    from flows.pipeline import stage_order
    from ladd.pipeline import load_pipeline, max_sequence_length

    _, project = pushed
    order = stage_order(project)
    assert order[0] == "prepare" and set(order) == ALL_STAGES
    assert (
        order.index("validate")
        < order.index("teacher")
        < order.index("synthesize")
        < order.index("distill")
        < order.index("align")
        < order.index("evaluate")
    )
    assert FLOW["first"] == dict.fromkeys(order, True) and FLOW["second"] == dict.fromkeys(order, False)
    out = dvc(project, "repro")
    assert ran_stages(out) == set() and "Data and pipelines are up to date" in out
    assert (project / "dvc.lock").read_text() == FLOW["lock"]
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert metrics["student"]["1"]["nfe"] == 1 and metrics["teacher"]["nfe"] == 8
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = store_runs(project)
    first, noop = sorted(
        (r for r in runs if r.data.tags.get("ladd.stage") == "pipeline"), key=lambda r: r.info.start_time
    )
    assert first.info.status == noop.info.status == "FINISHED" and first.data.tags["data_fingerprint.prepare"]
    assert first.data.params["distill.steps"] == "4"

    def stages_under(run):
        return {r.data.tags["ladd.stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == run.info.run_id}

    assert stages_under(first) == ALL_STAGES and stages_under(noop) == set()
    # the Datasets panel: what distill trained on and evaluate scored, each with the hash DVC locked for it
    lock = yaml.safe_load(FLOW["lock"])["stages"]
    prepared = next(o for o in lock["prepare"]["outs"] if o["path"] == "data/prepared")
    for stage, expected in (
        ("distill", {"prepared/train": "training"}),
        ("evaluate", {"prepared/train": "training", "prepared/test": "evaluation"}),
    ):
        (ran,) = [
            r
            for r in runs
            if r.data.tags.get("ladd.stage") == stage and r.data.tags.get("mlflow.parentRunId") == first.info.run_id
        ]
        inputs = client.get_run(ran.info.run_id).inputs.dataset_inputs
        assert {i.dataset.name: {t.key: t.value for t in i.tags}["mlflow.data.context"] for i in inputs} == expected
        assert {t.value for i in inputs for t in i.tags if t.key == "dvc.out.md5"} == {prepared["md5"]}
    assert str(client.get_model_version_by_alias("ladd-student", "champion").version) == "1"
    assert [str(v.version) for v in client.search_model_versions("name='ladd-student-onnx'")] == ["1"]
    assert json.loads((project / "reports" / "export.json").read_text())["max_abs_error"] <= 1e-3
    teacher = project / "models" / "teacher"
    image = load_pipeline(teacher)(
        "a handwritten digit five",
        num_inference_steps=2,
        guidance_scale=2.0,
        max_sequence_length=max_sequence_length(teacher),
    ).images[0]
    assert image.size == (32, 32)


def test_a_clone_and_pull_finds_nothing_to_run(pushed):
    """git clone + dvc pull: `dvc status` is clean and `dvc repro` runs no stage (the student is not retrained)."""
    base, alice = pushed
    assert "nothing to commit" in git(alice, "status")  # every output is in git or in DVC's cache: none left over
    git(base, "clone", "-q", str(alice), "bob")
    bob = base / "bob"
    dvc(bob, "pull")
    assert "Data and pipelines are up to date" in dvc(bob, "status")
    out = dvc(bob, "repro")
    assert ran_stages(out) == set() and "Data and pipelines are up to date" in out
    assert json.loads((bob / "reports" / "metrics.json").read_text()) == json.loads(
        (alice / "reports" / "metrics.json").read_text()
    )


def test_experiments_rerun_only_what_they_change_and_log_to_the_project_store(pushed):
    """An `evaluate.seeds` change in the workspace, with --temp, and two queued and run two at once: each runs
    evaluate alone; `dvc exp show` lists every headline metric of each; each experiment's evaluate run is in the
    project's store with its name; the student, evaluated under four protocols, is one registered version."""
    from mlflow.tracking import MlflowClient

    from ladd.gate import evaluations

    _, project = pushed
    before = len(store_runs(project))
    assert ran_stages(dvc(project, "exp", "run", "-n", "ws-seeds", "-S", "evaluate.seeds=[11,12]")) == {"evaluate"}
    assert ran_stages(dvc(project, "exp", "run", "--temp", "-n", "temp-seeds", "-S", "evaluate.seeds=[13,14]")) == {
        "evaluate"
    }
    for name, seeds in (("queued-a", "[15,16]"), ("queued-b", "[17,18]")):
        dvc(project, "exp", "run", "--queue", "-n", name, "-S", f"evaluate.seeds={seeds}")
    dvc(project, "exp", "run", "--run-all", "-j", "2")  # two experiments writing to one SQLite store at once
    for name in ("queued-a", "queued-b"):
        assert ran_stages(dvc(project, "queue", "logs", name)) == {"evaluate"}, name

    names = {"ws-seeds", "temp-seeds", "queued-a", "queued-b"}
    shown = json.loads(dvc(project, "exp", "show", "--json"))
    found = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                if rev.get("name") in names:
                    found[rev["name"]] = flat(rev["data"]["metrics"]["reports/metrics.json"]["data"])
    assert set(found) == names
    for name, metrics in found.items():
        assert HEADLINE <= set(metrics), (name, HEADLINE - set(metrics))
    assert len({found[n]["student.4.fd"] for n in names}) == 4  # four protocols, four figures
    diff = dvc(project, "exp", "diff", "queued-a", "queued-b")
    assert "student.4.fd" in diff and "evaluate.seeds" in diff

    runs = store_runs(project)
    assert len(runs) - before == 4  # one evaluate run per experiment, none lost
    tagged = {r.data.tags.get("dvc.experiment"): r for r in runs if r.data.tags.get("dvc.experiment")}
    assert set(tagged) == names and {r.data.tags["ladd.stage"] for r in tagged.values()} == {"evaluate"}
    head = git(project, "rev-parse", "HEAD").strip()
    assert all(r.data.tags["mlflow.source.git.commit"] == head for r in tagged.values())
    for name, run in tagged.items():
        assert run.data.metrics["student/4/fd"] == pytest.approx(found[name]["student.4.fd"])

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    versions = client.search_model_versions("name = 'ladd-student'")
    assert [str(v.version) for v in versions] == ["1"]
    held = evaluations(versions[0].tags)
    assert len(held) == 5 and sorted(e["decision"] for e in held.values()) == ["kept"] * 4 + ["promoted"]
    champion = client.get_model_version_by_alias("ladd-student", "champion")
    assert str(champion.version) == "1"


def test_a_pull_missing_an_object_fails_and_the_stage_names_what_is_missing(pushed):
    """A remote that lost the synthetic set's manifest: `dvc pull` fails with DVC's error (and checks out nothing),
    and `ladd distill` refuses to start in one line naming the missing file (exit 4), before any work."""
    base, alice = pushed
    remote = base / "remote-damaged"
    shutil.copytree(base / "remote", remote)
    lock = yaml.safe_load((alice / "dvc.lock").read_text())["stages"]["synthesize"]["outs"]
    listing = next(o["md5"] for o in lock if o["path"] == "data/synthetic")  # the directory's .dir object
    files = json.loads((remote / "files" / "md5" / listing[:2] / listing[2:]).read_text())
    manifest = next(f["md5"] for f in files if f["relpath"] == "manifest.json")
    (remote / "files" / "md5" / manifest[:2] / manifest[2:]).unlink()
    git(base, "clone", "-q", str(alice), "carol")
    carol = base / "carol"
    dvc(carol, "remote", "modify", "--local", "shared", "url", str(remote))
    code, pulled = sh([os.path.join(BIN, "dvc"), "pull"], carol, check=False)
    assert code != 0 and "failed to pull" in pulled.lower(), pulled
    code, stderr = sh([sys.executable, "-m", "ladd.cli", "distill", "--no-tracking"], carol, check=False)
    lines = [line for line in stderr.splitlines() if line.startswith("ladd distill: ")]
    assert code == 4 and len(lines) == 1 and " is missing" in lines[0], stderr[-3000:]  # the first input it lacks
    assert "Traceback" not in stderr
