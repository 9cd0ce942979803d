"""The only module that imports mlflow. Stages log through a `Tracker`; `NullTracker` does nothing.

Default store: SQLite in the working directory (`sqlite:///mlflow.db`); `MLFLOW_TRACKING_URI` points
it at a server. A stage run nests under the pipeline's run when `LADD_PARENT_RUN_ID` is set.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

DEFAULT_URI = "sqlite:///mlflow.db"
EXPERIMENT = "ladd"


class NullTracker:
    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict) -> None: ...


class MlflowTracker(NullTracker):
    def __init__(self, mlflow, run):
        self._mlflow, self.run = mlflow, run

    def log_params(self, params: dict) -> None:
        self._mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        log = self._mlflow.log_artifacts if path.is_dir() else self._mlflow.log_artifact
        log(str(path), artifact_path)

    def set_tags(self, tags: dict) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)


@contextlib.contextmanager
def stage_run(stage: str, enabled: bool = True):
    """An MLflow run for one stage (nested under LADD_PARENT_RUN_ID if set), or a NullTracker."""
    if not enabled:
        yield NullTracker()
        return
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT))
    parent = os.environ.get("LADD_PARENT_RUN_ID")
    with contextlib.ExitStack() as stack:
        if parent:
            stack.enter_context(mlflow.start_run(run_id=parent))
        run = stack.enter_context(mlflow.start_run(run_name=stage, nested=bool(parent), tags={"ladd.stage": stage}))
        yield MlflowTracker(mlflow, run)
