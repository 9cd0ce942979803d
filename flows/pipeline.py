"""The pipeline as a Prefect flow. Wiring only: the stage graph is dvc.yaml's, read through DVC, and
each stage runs as `dvc repro --single-item <stage>`, so dvc.lock and the cache end exactly as after
`dvc repro`, and up-to-date stages are skipped by DVC itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import networkx as nx
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact


def stage_order(repo: Path) -> list[str]:
    """Stage names of dvc.yaml in dependency order (DVC's own graph)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        graph = dvc_repo.index.graph  # edges point from a stage to the stages it depends on
        stages = [s for s in reversed(list(nx.topological_sort(graph))) if getattr(s, "name", None)]
        return [s.name for s in stages]


def _dvc() -> str:
    return str(Path(sys.executable).with_name("dvc"))


@task(retries=1, retry_delay_seconds=5, task_run_name="{stage}")
def repro_stage(repo: Path, stage: str) -> bool:
    """Run one stage through DVC; returns whether it ran (False: DVC found it up to date)."""
    logger = get_run_logger()
    proc = subprocess.run(
        [_dvc(), "repro", "--single-item", stage], cwd=repo, text=True, capture_output=True, env=os.environ.copy()
    )
    for line in (proc.stdout + proc.stderr).splitlines():
        logger.info("%s | %s", stage, line)
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage!r} failed (dvc exit {proc.returncode}); see the log above")
    return "didn't change, skipping" not in proc.stdout


@flow(name="ladd-pipeline", log_prints=True)
def pipeline(repo: str = ".") -> dict[str, bool]:
    """Run every stage of dvc.yaml in order; a failed stage stops the flow before the next one."""
    root = Path(repo).resolve()
    ran = {stage: repro_stage(root, stage) for stage in stage_order(root)}
    rows = "\n".join(f"| {s} | {'ran' if r else 'up to date'} |" for s, r in ran.items())
    create_markdown_artifact(key="ladd-stages", markdown=f"| stage | result |\n|---|---|\n{rows}\n")
    return ran


if __name__ == "__main__":
    pipeline(sys.argv[1] if len(sys.argv) > 1 else ".")
