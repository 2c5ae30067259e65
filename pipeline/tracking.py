"""Experiment tracking: the only importer of mlflow. A real tracker on rank 0, a no-op elsewhere."""
from __future__ import annotations

import os
import time
from typing import Mapping, Optional

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from pipeline.config import TrackingConfig
from pipeline.errors import HardnegError

_MAX_PARAM_LEN = 6000


def absolute_uri(uri: str, base_dir: str) -> str:
    """Make a relative ``sqlite:///file.db`` or plain path URI absolute against ``base_dir``."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(os.path.join(base_dir, uri[len("sqlite:///"):]))
    return uri


def default_artifact_location(uri: str, experiment: str) -> Optional[str]:
    """Artifacts of a SQLite store live beside the database file (absolute, so any cwd works)."""
    if uri.startswith("sqlite:///"):
        db_dir = os.path.dirname(uri[len("sqlite:///"):]) or "."
        return "file://" + os.path.abspath(os.path.join(db_dir, "mlartifacts", experiment))
    return None


def ui_command(uri: str) -> str:
    """The shell command that opens the MLflow UI on ``uri``'s store, bound to localhost."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


class NullTracker:
    """What every rank but 0 gets: all calls do nothing."""

    run_id: Optional[str] = None

    def log_params(self, params: Mapping) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_artifacts(self, local_dir: str, artifact_path: str) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(NullTracker):
    """One MLflow run; resumed when ``run_id`` is given (a restarted job logs into the same run)."""

    def __init__(self, cfg: TrackingConfig, run_id: Optional[str] = None):
        self.client = MlflowClient(tracking_uri=cfg.uri)
        self.last_steps: dict[str, int] = {}
        try:
            if run_id is not None:
                keys = self.client.get_run(run_id).data.metrics
                self.client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                # A restart replays the steps after its checkpoint: per metric, log only past what is stored.
                self.last_steps = {
                    k: max((m.step for m in self.client.get_metric_history(run_id, k)), default=-1) for k in keys
                }
                return
            experiment = self.client.get_experiment_by_name(cfg.experiment)
            if experiment is None:
                experiment_id = self.client.create_experiment(
                    cfg.experiment, artifact_location=default_artifact_location(cfg.uri, cfg.experiment)
                )
            else:
                experiment_id = experiment.experiment_id
            self.run_id = self.client.create_run(experiment_id, run_name=cfg.run_name).info.run_id
        except mlflow.exceptions.MlflowException as e:
            raise HardnegError(f"MLflow store {cfg.uri}: {str(e).splitlines()[0]}") from None

    def log_params(self, params: Mapping) -> None:
        """Log params once; on a resumed run the already-logged ones are skipped (MLflow params are immutable)."""
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in params.items() if k not in existing]
        for start in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log at ``step``; a metric's steps at or before the last one an earlier attempt stored are skipped."""
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if step > self.last_steps.get(k, -1)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def create_run(cfg: TrackingConfig) -> str:
    """Create the run up front (the launcher does this) so every restarted worker attaches to it."""
    tracker = MlflowTracker(cfg)
    return tracker.run_id


def make_tracker(cfg: TrackingConfig, is_main: bool, run_id: Optional[str] = None) -> NullTracker:
    """MlflowTracker on the main rank when tracking is enabled, else NullTracker."""
    if is_main and cfg.enabled:
        return MlflowTracker(cfg, run_id)
    return NullTracker()
