"""The pipeline as a Prefect flow. Wiring only: the stage graph is dvc.yaml's, read through DVC, and
each stage runs as `dvc repro --single-item <stage>`, so dvc.lock and the cache end exactly as after
`dvc repro`, and up-to-date stages are skipped by DVC itself."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import networkx as nx
import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from ladd.errors import Busy, ConfigError, DataError
from ladd.io import atomic_file, exclusive, fingerprint
from ladd.params import load_params
from ladd.schedules import check_student_times
from ladd.tracking import (
    PARENT_ENV,
    default_tracking_uri,
    finish_pipeline_run,
    masked_uri,
    run_page,
    start_pipeline_run,
    tracking_uri,
)


def stage_order(repo: Path) -> list[str]:
    """Stage names of dvc.yaml in dependency order (DVC's own graph)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        graph = dvc_repo.index.graph  # edges point from a stage to the stages it depends on
        return [s.name for s in reversed(list(nx.topological_sort(graph))) if getattr(s, "name", None)]


def _dvc() -> str:
    return str(Path(sys.executable).with_name("dvc"))


@task(retries=1, retry_delay_seconds=5, task_run_name="{stage}")
def repro_stage(repo: Path, stage: str, parent_run_id: str | None = None) -> bool:
    """Run one stage through DVC; returns whether it ran (False: DVC found it up to date). A retry covers
    transient failures (a held DVC lock, a tracking server blip); a real failure fails the flow."""
    logger = get_run_logger()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if parent_run_id:  # the stage's MLflow run nests under this pipeline execution's run
        env[PARENT_ENV] = parent_run_id
    output = []
    with subprocess.Popen(
        [_dvc(), "repro", "--single-item", stage],
        cwd=repo,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    ) as proc:
        for line in proc.stdout:  # streamed, so long stages log as they go
            output.append(line)
            if line.strip():
                logger.info("%s | %s", stage, line.rstrip())
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage!r} failed (dvc exit {proc.returncode}); see the log above")
    return "didn't change, skipping" not in "".join(output)


def _metrics_markdown(metrics: dict) -> str:
    rows = (
        [(f"reference teacher (CFG {metrics['reference']['guidance']:g})", metrics["reference"])]
        if "reference" in metrics
        else []
    )
    rows += [(f"teacher distilled from (CFG {metrics['teacher']['guidance']:g})", metrics["teacher"])]
    rows += [(f"teacher naive {k}", r) for k, r in metrics["teacher_naive"].items()]
    rows += [(f"student {k}", r) for k, r in metrics["student"].items()]
    rows += [(f"aligned {k}", r) for k, r in metrics.get("aligned", {}).items()]
    columns = [
        k
        for k in ("fd", "fd_teacher", "fd_reference", "clip_score", "accuracy", "reward", "precision", "recall")
        if any(k in r for _, r in rows)
    ]
    floor = metrics.get("real_floor")
    floors = [f"real-vs-real FD floor {floor['fd']:.2f} ± {floor['fd_std']:.2f}"] if floor else []
    lines = [
        f"{metrics['num_samples']} held-out prompts ({metrics.get('split', 'test')} split); mean ± std over seeds "
        f"{metrics['seeds']}; {metrics.get('features', 'classifier')} features; fd_teacher (FID-T) against the "
        "teacher distilled from, fd_reference against the reference teacher. " + "; ".join(floors),
        "",
        "| model | NFE | " + " | ".join(columns) + " | ms/image |",
        "|---|---|" + "---|" * len(columns) + "---|",
    ]

    def cell(r, k):
        if k not in r:
            return "–"
        return f"{r[k]:.3f}" if k in ("precision", "recall") else f"{r[k]:.2f} ± {r[k + '_std']:.2f}"

    lines += [
        f"| {name} | {r['nfe']} | " + " | ".join(cell(r, k) for k in columns) + f" | {r['ms_per_image']:.2f} |"
        for name, r in rows
    ]
    return "\n".join(lines)


def _align_markdown(report: dict) -> str:
    """reports/align.json as a before/after table: the student and the aligned student at each step count."""
    keys = [
        k
        for k in ("reward", "accuracy", "fd", "fd_teacher", "clip_score")
        if k in next(iter(report["before"].values()))
    ]
    lines = [
        f"Preference stage (DPO-LoRA, reward `{report['reward']}`): {report['num_samples']} held-out prompts, "
        "mean ± std "
        f"over seeds {report['seeds']}",
        "",
        "| steps | " + " | ".join(f"{k} before | {k} after" for k in keys) + " |",
        "|---|" + "---|---|" * len(keys),
    ]
    for steps, before in report["before"].items():
        after = report["after"][steps]
        lines.append(
            f"| {steps} | "
            + " | ".join(f"{r[k]:.3f} ± {r[k + '_std']:.3f}" for k in keys for r in (before, after))
            + " |"
        )
    return "\n".join(lines)


def _distill_markdown(summary: dict, run: dict) -> str:
    health = summary.get("gan_health", {})
    flag = {
        "ok": "",
        "off": "",
        "partial": "**Warning: the heads separate real from fake at some student times only.** ",
    }.get(health.get("status"), "**Warning: the adversarial part did not work.** ")
    cost = f", {run['sec_per_step'] * 1000:.0f} ms/step on {run['device']} x {run['world_size']}" if run else ""
    return (
        f"{flag}GAN health: {health.get('summary', 'not recorded')}\n\n"
        f"{summary['steps']} steps{cost}, {summary['skipped_updates']} skipped updates."
    )


def _export_markdown(report: dict) -> str:
    lines = [
        f"Max abs error ORT vs PyTorch: {report['max_abs_error']:.2e} on {report['provider']}",
        "",
        "| batch | torch ms | ORT ms | ratio |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {b} | {r['torch_ms']:.2f} | {r['ort_ms']:.2f} | {r['ort_ms'] / r['torch_ms']:.2f} |"
        for b, r in report["latency"].items()
    ]
    return "\n".join(lines)


def _publish(root: Path, params: dict) -> dict:
    """Prefect artifacts and a summary of where the results are."""
    reports = root / params.get("evaluate", {}).get("out_dir", "reports")
    where = {
        "student": root / params.get("distill", {}).get("out_dir", "models/student"),
        "metrics": reports / "metrics.json",
        "grids": reports / "grids",
    }
    if where["metrics"].is_file():
        create_markdown_artifact(
            key="ladd-metrics",
            markdown=_metrics_markdown(json.loads(where["metrics"].read_text())),
            description="Quality vs steps (ladd evaluate)",
        )
    train_summary = where["student"] / "ladd_train_summary.json"
    distill_reports = root / params.get("distill", {}).get("report_dir", "reports")
    run_report = distill_reports / "distill.json"
    if train_summary.is_file():
        run = json.loads(run_report.read_text()) if run_report.is_file() else {}
        create_markdown_artifact(
            key="ladd-distill",
            markdown=_distill_markdown(json.loads(train_summary.read_text()), run),
            description="Distillation: GAN health and cost (ladd distill)",
        )
    curves = distill_reports / "distill_curve.png"
    if curves.is_file():
        create_link_artifact(
            key="ladd-curves", link=curves.resolve().as_uri(), link_text="distillation curves (per-head logits)"
        )
    export = root / params.get("export", {}).get("report", "reports/export.json")
    if export.is_file():
        where["onnx"] = root / params.get("export", {}).get("out_dir", "models/onnx")
        where["single_file"] = root / params.get("export", {}).get("single_file_dir", "models/single_file")
        create_markdown_artifact(
            key="ladd-onnx",
            markdown=_export_markdown(json.loads(export.read_text())),
            description="ONNX export: parity and latency (ladd export)",
        )
    align = reports / "align.json"
    report = json.loads(align.read_text()) if align.is_file() else {}
    if report.get("enabled"):
        where["aligned"] = root / params.get("align", {}).get("out_dir", "models/aligned")
        create_markdown_artifact(
            key="ladd-align",
            markdown=_align_markdown(report),
            description="Preference stage: the student before and after (ladd align)",
        )
        if (where["aligned"] / "align_curve.png").is_file():
            create_link_artifact(
                key="ladd-align-curve",
                link=(where["aligned"] / "align_curve.png").resolve().as_uri(),
                link_text="preference stage curves (DPO loss, implicit accuracy, fresh-sample reward)",
            )
    grid = where["grids"] / "teacher_vs_student.png"
    if grid.is_file():
        create_link_artifact(key="ladd-grid", link=grid.resolve().as_uri(), link_text="teacher vs student grid")
    return {k: str(v) for k, v in where.items()}


@flow(name="ladd-pipeline", log_prints=True)
def pipeline(repo: str = ".", params_file: str = "params.yaml") -> dict[str, bool]:
    """Run every stage of dvc.yaml in order; a failed stage stops the flow before the next one.

    `params_file` (relative to `repo`) other than the repo's params.yaml is copied over it first: DVC
    reads params.yaml, and this is how a deployment applies another parameter set."""
    root = Path(repo).resolve()
    with one_run(root):
        return _pipeline(root, params_file)


def check_settings(root: Path, params_file: Path) -> None:
    """Every setting, before the first stage: `ladd`'s own load (paths relative to `root`) and distill's check of
    its times against their schedule, which `ladd distill` would only make after the teacher has trained."""
    with contextlib.chdir(root):
        distill = load_params(params_file).distill
    check_student_times(distill.schedule, distill.student_times)


def one_run(root: Path):
    """The workspace's flow lock: one flow run at a time (each `dvc repro --single-item` releases DVC's own lock
    between stages, so two flows would interleave their stages)."""
    return exclusive(root / ".dvc" / "tmp" / "ladd-pipeline", busy=f"another ladd pipeline is running in {root}")


def _pipeline(root: Path, params_file: str) -> dict[str, bool]:
    source = (root / params_file).resolve()
    if source != (root / "params.yaml").resolve():
        print(f"using {source} as {root / 'params.yaml'}")
        with atomic_file(root / "params.yaml") as tmp:  # a kill mid-copy leaves the previous params.yaml whole
            shutil.copyfile(source, tmp)
    check_settings(root, root / "params.yaml")
    params = yaml.safe_load((root / "params.yaml").read_text()) or {}
    # one store for the flow and every stage process: the repo's SQLite file unless a server is set
    os.environ.setdefault("MLFLOW_TRACKING_URI", default_tracking_uri(root))
    run_id = None
    if os.environ.get("LADD_TRACKING", "1") != "0":  # fails fast when a tracking server is unreachable
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        run_id = start_pipeline_run(params, {"git_commit": commit or "unknown"})
    status = "FAILED"
    try:
        ran = {stage: repro_stage(root, stage, run_id) for stage in stage_order(root)}
        status = "FINISHED"
    finally:
        if run_id:
            data = {
                f"data_fingerprint.{k}": fingerprint(root / params[k]["out_dir"])
                for k in ("prepare", "synthesize")
                if (root / params.get(k, {}).get("out_dir", "-")).exists()
            }
            finish_pipeline_run(run_id, data, status)
    rows = "\n".join(f"| {s} | {'ran' if r else 'up to date'} |" for s, r in ran.items())
    create_markdown_artifact(key="ladd-stages", markdown=f"| stage | result |\n|---|---|\n{rows}\n")
    where = _publish(root, params)
    if run_id:
        where["mlflow"] = f"{masked_uri(tracking_uri())} run {run_id}, UI page {run_page(run_id)}"
        create_markdown_artifact(
            key="ladd-mlflow-run",
            markdown=f"MLflow run `{run_id}` in `{masked_uri(tracking_uri())}`: page "
            f"`{run_page(run_id)}` of the UI (`mlflow ui --backend-store-uri sqlite:///mlflow.db "
            "--host 127.0.0.1` for the default store)",
        )
    print("\n".join(["ladd pipeline finished:"] + [f"  {k:8s} {v}" for k, v in where.items()]))
    return ran


if __name__ == "__main__":
    repo = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    try:  # refused at once, in one line, before Prefect starts its server; the flow takes the lock itself
        with one_run(repo):
            pass
        check_settings(repo, repo / (sys.argv[2] if len(sys.argv) > 2 else "params.yaml"))
    except (Busy, ConfigError, DataError) as e:  # exit codes as `ladd`'s (docs/guide/troubleshooting.md)
        print(f"ladd pipeline: {e}", file=sys.stderr)
        sys.exit(next(code for kind, code in {Busy: 8, ConfigError: 2, DataError: 3}.items() if isinstance(e, kind)))
    pipeline(*sys.argv[1:])
