"""Runs, metrics, artifacts and datasets in MLflow (the model registry is `ladd.registry`; the two are the only
modules that import mlflow). Stages log through a `Tracker`; `NullTracker` does nothing.

Default store: the project's SQLite file, `mlflow.db` in the project folder by absolute path, whatever directory
a stage runs in: a DVC experiment run in a temporary workspace (`dvc exp run --temp`, `--queue`) logs to the
store of the project it came from, tagged with the experiment's name and commit. `MLFLOW_TRACKING_URI` points it
at a server, which is checked before any work starts. A stage run nests under the pipeline's run when
`LADD_PARENT_RUN_ID` is set (the Prefect flow sets it), so one pipeline execution is one run.
"""

from __future__ import annotations

import base64
import contextlib
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pandas as pd

from ladd.errors import TrackingUnavailable

EXPERIMENT = "ladd"
PARENT_ENV = "LADD_PARENT_RUN_ID"
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


class NullTracker:
    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_summary(self, metrics: dict) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_datasets(self, data_dir, contexts: dict[str, str]) -> None: ...


class MlflowTracker(NullTracker):
    def __init__(self, mlflow, run, model_config: dict | None = None):
        self._mlflow, self.run, self.model_config = mlflow, run, model_config  # model_config: the serve limits

    def log_params(self, params: dict) -> None:
        self._mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self._mlflow.log_metrics({k.replace("@", "_"): float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        log = self._mlflow.log_artifacts if path.is_dir() else self._mlflow.log_artifact
        log(str(path), artifact_path)

    def log_summary(self, metrics: dict) -> None:
        """Metrics on this run and on the pipeline run it nests under: MLflow's Compare view of pipeline runs
        shows only their own metrics."""
        self.log_metrics(metrics)
        parent = self.run.data.tags.get("mlflow.parentRunId")
        if parent:
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient

            now = int(time.time() * 1000)
            items = [Metric(k.replace("@", "_"), float(v), now, 0) for k, v in metrics.items()]
            for i in range(0, len(items), 1000):  # MLflow's batch limit
                MlflowClient().log_batch(parent, metrics=items[i : i + 1000])

    def set_tags(self, tags: dict) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_datasets(self, data_dir, contexts: dict[str, str]) -> None:
        """The splits of `data_dir` as the run's MLflow datasets ({split: context}, e.g. train: training), each named
        by its path and identified by the hash DVC gives it; tagged with the hash of the whole folder, the one
        dvc.lock records for the prepare stage's output. Hashes only: nothing is loaded."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.types import ColSpec, Schema

        from ladd.io import dvc_md5s

        hashes = dvc_md5s(data_dir)
        for split, context in contexts.items():
            path = Path(data_dir) / split
            dataset = MetaDataset(
                resolve_dataset_source(str(path.resolve())),
                name=f"{Path(data_dir).name}/{split}",
                digest=hashes[split],
                schema=Schema([ColSpec("string", "prompt")]),
            )
            self._mlflow.log_input(
                dataset,
                context=context,
                tags={"dvc.md5": hashes[split], "dvc.out": str(data_dir), "dvc.out.md5": hashes[""]},
            )


def project_dir(start: str | Path | None = None) -> Path:
    """The project folder whose store a stage logs to: `start` (default: the working directory, which `ladd` sets
    to its params file's folder). DVC runs every stage with DVC_ROOT set to the root of the repository the run
    belongs to, and in an experiment's temporary copy of it (.dvc/tmp/exps/...) to the original's: the same
    folder there."""
    here = Path(start or Path.cwd()).resolve()
    root = os.environ.get("DVC_ROOT")
    repo = next((d for d in (here, *here.parents) if (d / ".dvc").is_dir()), None) if root else None
    return Path(root).resolve() / here.relative_to(repo) if repo else here


def default_tracking_uri(start: str | Path | None = None) -> str:
    return f"sqlite:///{project_dir(start) / 'mlflow.db'}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def provenance_tags() -> dict:
    """Where a stage run comes from: the git commit of the working tree and, under `dvc exp run`, the experiment's
    name and baseline commit (DVC sets them), so a sweep compares in MLflow as in `dvc exp show`."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:  # no git on this machine (a container, say): the run goes on without the tag
        commit = ""
    tags = {"mlflow.source.git.commit": commit} if commit else {}
    if os.environ.get("DVC_EXP_NAME"):
        tags |= {
            "dvc.experiment": os.environ["DVC_EXP_NAME"],
            "dvc.baseline": os.environ.get("DVC_EXP_BASELINE_REV", ""),
        }
    return tags


def as_tracking_unavailable(error: Exception) -> TrackingUnavailable | None:
    """A TrackingUnavailable for an error that says the tracking server stopped answering mid-stage (requests'
    ConnectionError, an OSError, or MLflow's wrapping of it after its retries); None for any other error."""
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    parts = urllib.parse.urlsplit(uri)
    text = str(error)
    server = f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname
    if not server or server not in text:
        return None
    from mlflow.exceptions import MlflowException
    from requests.exceptions import ConnectionError as Unreachable

    lost = isinstance(error, Unreachable) or (
        isinstance(error, MlflowException) and text.startswith("API request to") and "failed with" in text
    )
    if not lost:
        return None
    return TrackingUnavailable(
        f"the MLflow tracking server {masked_uri(uri)} stopped answering during the stage; the "
        "local outputs written so far are kept: restart it and run the same command again"
    )


def masked_uri(uri: str) -> str:
    """`uri` with any password in it replaced by ***, for messages and logs."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def check_tracking_server(uri: str | None = None, timeout: float = 5.0) -> None:
    """Fail fast, before any long computation, when an http(s) tracking server does not answer. Credentials in
    the URI (user:password@host) are sent as basic auth, as MLflow sends them, and never printed."""
    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        parts = urllib.parse.urlsplit(uri)
        host = parts.hostname + (f":{parts.port}" if parts.port else "")  # port: ValueError when not a number
        request = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=host)).rstrip("/") + "/health")
        if parts.username is not None:
            token = base64.b64encode(f"{parts.username}:{parts.password or ''}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            if resp.status != 200:
                raise RuntimeError(f"status {resp.status}")
    except (urllib.error.URLError, OSError, RuntimeError, ValueError, TypeError) as e:
        reason = str(e).replace(parts.password, "***") if parts.password else str(e)
        raise TrackingUnavailable(
            f"MLflow tracking server {masked_uri(uri)} is unreachable ({reason}); start it, unset "
            "MLFLOW_TRACKING_URI, or pass --no-tracking"
        ) from None


def _drop_half_migrated_tables(db: Path) -> None:
    """A run killed while MLflow creates or migrates a new SQLite store leaves alembic's `_alembic_tmp_*` copy of a
    table behind, and every later migration fails on it. The schema version is stamped only after a step, so
    dropping the copy lets MLflow redo that step."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(db, timeout=60)) as conn:
        names = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name LIKE '\\_alembic\\_tmp\\_%' ESCAPE '\\'"
            )
        ]
        for table in names:
            conn.execute(f'DROP TABLE "{table}"')
        conn.commit()


def _create_store(db: Path) -> None:
    """A new SQLite store, made whole beside `db` and only then linked into place: a run killed while MLflow
    creates and migrates the tables (~100 steps, none of them undone by a kill) leaves no half-made store behind,
    only a temp file. A store another process linked first wins."""
    import tempfile

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{db.name}.", suffix=".tmp", dir=db.parent)
    os.close(fd)
    try:
        SqlAlchemyStore(f"sqlite:///{tmp}", (db.resolve().parent / "mlruns").as_uri()).engine.dispose()
        with contextlib.suppress(FileExistsError):
            os.link(tmp, db)
    finally:
        os.unlink(tmp)


def _mlflow():
    import mlflow

    uri, name = tracking_uri(), os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        _create_store(Path(uri.removeprefix("sqlite:///")))
    if uri.startswith("sqlite:///") and Path(uri.removeprefix("sqlite:///")).is_file():
        _drop_half_migrated_tables(Path(uri.removeprefix("sqlite:///")))
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(name) is None:
        # artifacts beside the database (MLflow's default is ./mlruns of whichever process creates the experiment)
        db = Path(uri.removeprefix("sqlite:///"))
        mlflow.create_experiment(name, artifact_location=(db.resolve().parent / "mlruns").as_uri())
    experiment = mlflow.set_experiment(name)
    if experiment.tags.get(EXPERIMENT_KIND) != MODEL_TRAINING:
        # the experiment's kind as the UI records it (its "Machine learning" experiment type)
        mlflow.tracking.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
    return mlflow


@contextlib.contextmanager
def stage_run(stage: str, enabled: bool = True, model_config: dict | None = None):
    """An MLflow run for one stage (nested under LADD_PARENT_RUN_ID if set), or a NullTracker. `model_config`: the
    request limits (params' `serve`) of the models it logs."""
    if not enabled:
        yield NullTracker()
        return
    check_tracking_server()
    mlflow = _mlflow()
    parent = os.environ.get(PARENT_ENV)
    with contextlib.ExitStack() as stack:
        if parent:
            stack.enter_context(mlflow.start_run(run_id=parent))
        run = stack.enter_context(
            mlflow.start_run(run_name=stage, nested=bool(parent), tags={"ladd.stage": stage, **provenance_tags()})
        )
        yield MlflowTracker(mlflow, run, model_config)


def start_pipeline_run(params: dict, tags: dict) -> str:
    """Open the run of one pipeline execution (flattened params, git commit...) and return its id."""
    check_tracking_server()
    mlflow = _mlflow()
    flat = pd.json_normalize(params, sep=".").iloc[0].to_dict() if params else {}
    with mlflow.start_run(
        run_name="pipeline", tags={"ladd.stage": "pipeline", **{k: str(v) for k, v in tags.items()}}
    ) as run:
        mlflow.log_params({k: str(v)[:6000] for k, v in flat.items()})
        return run.info.run_id


def run_page(run_id: str) -> str:
    """The run's page in the MLflow UI, relative to its address, in the model-training view: MLflow 3.17's UI
    keeps one view for every experiment (GenAI unless chosen), so the link chooses it."""
    experiment = _mlflow().tracking.MlflowClient().get_run(run_id).info.experiment_id
    return f"#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning"


def finish_pipeline_run(run_id: str, tags: dict, status: str = "FINISHED") -> None:
    mlflow = _mlflow()
    client = mlflow.tracking.MlflowClient()
    for k, v in tags.items():
        client.set_tag(run_id, k, str(v))
    client.set_terminated(run_id, status)
