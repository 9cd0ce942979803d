"""`dvc repro` reruns exactly what changed: each stage's code deps are its `ladd` import closure (checked
against dvc.yaml, then against DVC itself in a temp repo), and a retrain with identical weights gives the
student the same hash (no timings or host facts inside it)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CHECKPOINT, ROOT, RUN_REPORT, dvc, init_repo

sys.path.insert(0, str(ROOT / "scripts"))
from stage_deps import stage_code  # noqa: E402

SCRIPT = ROOT / "scripts" / "stage_deps.py"
EARLY_STAGES = {"prepare", "validate", "classifier", "teacher"}


def _check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--check", "--root", str(root)], capture_output=True, text=True)


def test_dvc_yaml_lists_each_stages_import_closure(tmp_path):
    assert _check(ROOT).returncode == 0, _check(ROOT).stderr
    code = stage_code()
    # imports inside functions and at depth count: evaluate -> quality -> classifier; distill's data reader
    assert "ladd/classifier.py" in code["evaluate"] and "ladd/data/synthetic.py" in code["distill"]
    assert all("ladd/cli.py" in files and "ladd/config.py" in files for files in code.values())
    # the student's schedule is distill's and after: a change to it never retrains the teacher
    assert {s for s, files in code.items() if "ladd/schedules.py" in files} == {
        "distill",
        "align",
        "evaluate",
        "export",
    }
    assert "ladd/synthesize.py" not in code["distill"] and "ladd/evaluate.py" not in code["export"]
    # and the check can fail: one line gone from a copy, named with its stage
    shutil.copytree(ROOT / "ladd", tmp_path / "ladd", ignore=shutil.ignore_patterns("__pycache__"))
    text = (ROOT / "dvc.yaml").read_text()
    distill = text.index("  distill:")
    (tmp_path / "dvc.yaml").write_text(text[:distill] + text[distill:].replace("      - ladd/variants.py\n", "", 1))
    proc = _check(tmp_path)
    assert proc.returncode == 1 and "stage distill: missing ladd/variants.py" in proc.stderr


def _outputs(project: Path) -> list[str]:
    """Every output path of dvc.yaml, its ${...} resolved from params.yaml."""
    params = yaml.safe_load((project / "params.yaml").read_text())

    def resolve(path: str) -> str:
        def value(m):
            node = params
            for key in m.group(1).split("."):
                node = node[key]
            return str(node)

        return re.sub(r"\$\{([^}]+)\}", value, path)

    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    entries = [e for s in stages.values() for kind in ("outs", "metrics", "plots") for e in s.get(kind, [])]
    return [resolve(e if isinstance(e, str) else next(iter(e))) for e in entries]


@pytest.mark.slow
def test_editing_a_module_marks_exactly_the_stages_that_import_it(smoke_project):
    """Every ladd module, edited in turn in a temp repo whose outputs dvc.lock records: `dvc status` names the
    stages whose import closure holds it, and only those."""
    init_repo(smoke_project)
    for out in _outputs(smoke_project):  # placeholders: only the code deps are under test
        path = smoke_project / out
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix:
            path.write_text("{}\n")
        else:
            path.mkdir(exist_ok=True)
            (path / "placeholder").write_text(out)
    dvc(smoke_project, "commit", "-f", "-q")
    assert json.loads(dvc(smoke_project, "status", "--json", "-q") or "{}") == {}
    code = stage_code(smoke_project)
    modules = sorted(p.relative_to(smoke_project).as_posix() for p in (smoke_project / "ladd").rglob("*.py"))
    assert len(modules) > 25
    from dvc.repo import Repo

    with Repo(str(smoke_project)) as repo:  # DVC's own status, in this process: one CLI start per module is 20 s
        for module in modules:
            path = smoke_project / module
            original = path.read_text()
            path.write_text(original + "# edited\n")
            changed = {address.rsplit(":", 1)[-1] for address in repo.status()}  # <dvc.yaml path>:<stage>
            path.write_text(original)
            assert changed == {s for s, files in code.items() if module in files}, module
            if module == "ladd/schedules.py":  # the student's time schedule: the stages before distill stay put
                assert changed and not changed & EARLY_STAGES, changed


@pytest.mark.slow
def test_a_retrain_with_identical_weights_keeps_the_students_hash(finished_project, tmp_path):
    """`ladd distill` from step 0 twice under DVC: the student's hash in dvc.lock is the same both times and
    the run report (timings) lives outside it."""
    project = tmp_path / "project"
    shutil.copytree(finished_project, project)
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    shutil.copytree(ROOT / "ladd", project / "ladd", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((project / "params.yaml").read_text())
    init_repo(project)
    hashes, reports = [], []
    for _ in range(2):
        (project / CHECKPOINT).unlink(missing_ok=True)  # train from step 0, not resume
        dvc(project, "repro", "--single-item", "--force", "distill")
        lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["distill"]
        hashes.append(next(o["md5"] for o in lock["outs"] if o["path"] == params["distill"]["out_dir"]))
        reports.append(json.loads((project / RUN_REPORT).read_text()))
    assert hashes[0] == hashes[1]
    assert all(r["resumed_from"] == 0 and r["sec_per_step"] > 0 for r in reports)
    summary = json.loads((project / params["distill"]["out_dir"] / "ladd_train_summary.json").read_text())
    assert not {"sec_per_step", "device", "world_size", "resumed_from"} & set(summary)


def test_safetensors_with_metadata_are_the_same_bytes_in_every_process(tmp_path):
    """safetensors writes `__metadata__` in a per-process hash order: ladd's writes (single-file exports, LoRA
    adapters) sort it, so an export rerun keeps its DVC hash. Five processes, one file each, one set of bytes."""
    script = (
        "import sys, torch; from ladd.io import save_tensors; "
        "save_tensors({'b': torch.ones(3), 'a': torch.zeros(2)}, sys.argv[1], "
        "{'format': 'pt', 'ladd': '{\"x\": 1}', 'ladd_lora_config': 'é', 'z': 'y'})"
    )
    files = [tmp_path / f"{i}.safetensors" for i in range(5)]
    for path in files:
        subprocess.run([sys.executable, "-c", script, str(path)], check=True)
    assert len({path.read_bytes() for path in files}) == 1
    from safetensors import safe_open

    with safe_open(files[0], "pt") as f:  # still a valid file, every entry as written
        assert f.metadata() == {"format": "pt", "ladd": '{"x": 1}', "ladd_lora_config": "é", "z": "y"}
        assert torch.equal(f.get_tensor("b"), torch.ones(3)) and torch.equal(f.get_tensor("a"), torch.zeros(2))
