"""Experiment tracking: the only importer of mlflow. A real tracker on rank 0, a no-op elsewhere.

Secrets never reach the store as params or tags: values under secret-looking keys, credentials
inside URLs and access-key-shaped strings are redacted before logging (see ``redact``).
"""
from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from importlib import metadata
from typing import Any, Mapping, Optional

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from pipeline.config import TrackingConfig
from pipeline.errors import HardnegError

_MAX_PARAM_LEN = 6000
REDACTED = "***"
_SECRET_KEY = re.compile(r"(secret|token|passw(or)?d|pwd|api[_-]?key|access[_-]?key|credential|private[_-]?key|auth)",
                         re.IGNORECASE)
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^/@:\s]*):(?P<password>[^/@\s]+)@",
                              re.IGNORECASE)
_SECRET_VALUE = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b|\bgh[pousr]_[A-Za-z0-9]{30,}\b|\bsk-[A-Za-z0-9_-]{20,}\b")
_VERSIONED_PACKAGES = ("torch", "torchvision", "ray", "mlflow", "webdataset", "fsspec", "numpy", "pydantic")


def redact_value(key: str, value: Any) -> Any:
    """``value`` with anything secret-looking replaced by ``***`` (by key name, URL password, key shape)."""
    if value is None:
        return None
    if _SECRET_KEY.search(key.rsplit(".", 1)[-1]):
        return REDACTED
    if isinstance(value, str):
        value = _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", value)
        return _SECRET_VALUE.sub(REDACTED, value)
    return value


def redact(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """Redact every value of a flat or nested mapping (nested keys are checked by their own name)."""
    out = {}
    for key, value in mapping.items():
        out[key] = redact(value) if isinstance(value, Mapping) else redact_value(str(key), value)
    return out


def absolute_uri(uri: str, base_dir: str) -> str:
    """Make a relative ``sqlite:///file.db`` URI absolute against ``base_dir``."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(os.path.join(base_dir, uri[len("sqlite:///"):]))
    return uri


def default_artifact_location(cfg: TrackingConfig) -> Optional[str]:
    """Where a new experiment's artifacts go: tracking.artifact_location, else beside a SQLite file."""
    if cfg.artifact_location:
        return cfg.artifact_location
    if cfg.uri.startswith("sqlite:///"):
        db_dir = os.path.dirname(cfg.uri[len("sqlite:///"):]) or "."
        return "file://" + os.path.abspath(os.path.join(db_dir, "mlartifacts", cfg.experiment))
    return None  # a tracking server decides (its --artifacts-destination)


def ui_command(uri: str) -> str:
    """The shell command that opens the MLflow UI on ``uri``'s store, bound to localhost."""
    if uri.startswith(("http://", "https://")):
        return f"open {redact_value('uri', uri)} in a browser"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def run_context() -> dict[str, str]:
    """Params describing where a run ran: git commit, package versions, hardware."""
    context = {"hardware.platform": platform.platform(), "hardware.cpus": str(os.cpu_count())}
    try:
        import torch

        if torch.cuda.is_available():
            context["hardware.gpu"] = torch.cuda.get_device_name(0)
            context["hardware.gpus"] = str(torch.cuda.device_count())
    except Exception:  # hardware probing must never stop a run
        pass
    for package in _VERSIONED_PACKAGES:
        try:
            context[f"version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            context["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10)
            context["git_dirty"] = str(bool(dirty.stdout.strip()))
    except (OSError, subprocess.TimeoutExpired):
        pass
    return context


class NullTracker:
    """What every rank but 0 gets: all calls do nothing."""

    run_id: Optional[str] = None

    def log_params(self, params: Mapping) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_artifact(self, local_path: str, artifact_path: Optional[str] = None) -> None: ...
    def log_artifacts(self, local_dir: str, artifact_path: str) -> None: ...
    def log_model(self, module, name: str, example) -> None: ...
    def history(self, key: str) -> list[tuple[int, float]]:
        return []
    def finish(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(NullTracker):
    """One MLflow run; attached to when ``run_id`` is given (a resumed or restarted job logs into it)."""

    def __init__(self, cfg: TrackingConfig, run_id: Optional[str] = None, system_metrics: bool = False):
        self.cfg = cfg
        self.client = MlflowClient(tracking_uri=cfg.uri)
        self.last_steps: dict[str, int] = {}
        self.previous_status: Optional[str] = None  # of an attached run, before we marked it RUNNING
        self._monitor = None
        try:
            if run_id is not None:
                attached = self.client.get_run(run_id)
                keys, self.previous_status = attached.data.metrics, attached.info.status
                self.client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                # A restart replays the steps after its checkpoint: per metric, log only past what is stored.
                self.last_steps = {k: max((m.step for m in self.client.get_metric_history(run_id, k)), default=-1)
                                   for k in keys}
            else:
                experiment = self.client.get_experiment_by_name(cfg.experiment)
                if experiment is None:
                    experiment_id = self.client.create_experiment(
                        cfg.experiment, artifact_location=default_artifact_location(cfg))
                else:
                    experiment_id = experiment.experiment_id
                self.run_id = self.client.create_run(experiment_id, run_name=redact_value("run_name", cfg.run_name)).info.run_id
        except mlflow.exceptions.MlflowException as e:
            raise HardnegError(f"MLflow store {redact_value('uri', cfg.uri)}: {str(e).splitlines()[0]}") from None
        if system_metrics and cfg.system_metrics_every_s > 0:
            self._start_system_metrics(resume=run_id is not None)

    def _start_system_metrics(self, resume: bool) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.cfg.system_metrics_every_s,
                                             resume_logging=resume, tracking_uri=self.cfg.uri)
        self._monitor.start()

    def log_params(self, params: Mapping) -> None:
        """Log params once, redacted; already-logged ones are skipped (MLflow params are immutable)."""
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in redact(params).items() if k not in existing]
        for start in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[start : start + 100])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in redact(tags).items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log at ``step``; a metric's steps at or before the last one an earlier attempt stored are skipped."""
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if step > self.last_steps.get(k, -1)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, local_path: str, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, local_path, artifact_path)

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def history(self, key: str) -> list[tuple[int, float]]:
        """[(step, value)] of one metric, in step order."""
        return sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, key))

    def log_model(self, module, name: str, example) -> None:
        """Log ``module`` as an MLflow PyTorch model (and register it when tracking.registered_model is set)."""
        import mlflow.pytorch
        from mlflow.models import infer_signature

        with_grad_off = module.training
        module.eval()
        try:
            import torch

            with torch.no_grad():
                output = module(example)
            signature = infer_signature(example.numpy(), output.numpy())
            mlflow.set_tracking_uri(self.cfg.uri)
            with mlflow.start_run(run_id=self.run_id):
                mlflow.pytorch.log_model(
                    module, name=name, signature=signature, registered_model_name=self.cfg.registered_model,
                    input_example=example.numpy(),
                    pip_requirements=[f"torch=={metadata.version('torch')}",
                                      f"torchvision=={metadata.version('torchvision')}"],
                )
        finally:
            module.train(with_grad_off)

    def finish(self, status: str = "FINISHED") -> None:
        if self._monitor is not None:
            self._monitor.finish()
        self.client.set_terminated(self.run_id, status=status)


CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def check_server_access(cfg: TrackingConfig, environ: Mapping[str, str] = os.environ, timeout_s: float = 60.0) -> None:
    """One authenticated request to an http(s) tracking server, so a server that is down or refuses the
    credentials (MLFLOW_TRACKING_USERNAME / _PASSWORD, as MLflow's client sends them) fails before training.

    File and SQLite stores need no check. The password is never part of a message.
    """
    if not (cfg.enabled and cfg.uri.startswith(("http://", "https://"))):
        return
    import requests  # MLflow's own HTTP client; one request, without MLflow's minutes of retries

    uri = redact_value("uri", cfg.uri)
    user, password = (environ.get(name) for name in CREDENTIAL_VARS)
    auth = (user, password) if user and password else None
    try:
        response = requests.get(f"{cfg.uri.rstrip('/')}/api/2.0/mlflow/experiments/search",
                                params={"max_results": 1}, auth=auth, timeout=timeout_s)
    except requests.RequestException as e:
        raise HardnegError(f"tracking.uri={uri}: no MLflow server answers ({type(e).__name__}); start it or fix "
                           f"the URI") from None
    if response.status_code == 401:
        if auth is None:
            missing = " and ".join(name for name in CREDENTIAL_VARS if not environ.get(name))
            raise HardnegError(f"tracking.uri={uri} asks for credentials (HTTP 401) and {missing} is not set; "
                               f"export both for your MLflow account")
        raise HardnegError(f"tracking.uri={uri} refused MLFLOW_TRACKING_USERNAME={user} (HTTP 401): wrong user "
                           f"name or MLFLOW_TRACKING_PASSWORD")
    if response.status_code == 403:
        raise HardnegError(f"tracking.uri={uri}: MLFLOW_TRACKING_USERNAME={user} may not read experiments (HTTP 403); "
                           f"ask the server's admin for access")
    if not response.ok:
        raise HardnegError(f"tracking.uri={uri}: the server answered HTTP {response.status_code} to an experiment "
                           f"search; is it an MLflow tracking server?")


def create_run(cfg: TrackingConfig) -> str:
    """Create the run up front (the launcher does this) so every restarted worker attaches to it."""
    return MlflowTracker(cfg).run_id


def make_tracker(cfg: TrackingConfig, is_main: bool, run_id: Optional[str] = None) -> NullTracker:
    """MlflowTracker (with system metrics) on the main rank when tracking is enabled, else NullTracker."""
    if is_main and cfg.enabled:
        return MlflowTracker(cfg, run_id, system_metrics=True)
    return NullTracker()


def _mean(values: list[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def runs_table(uri: str, experiment: str) -> list[dict[str, Any]]:
    """One row per run of ``experiment``: method, key hyper-parameters, kNN/linear top-1, images/s."""
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise HardnegError(f"no experiment '{experiment}' in {redact_value('uri', uri)}; experiments: {names}")
    rows = []
    for run in client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"]):
        p, m = run.data.params, run.data.metrics
        rows.append({
            "run": run.info.run_name, "status": run.info.status, "method": p.get("loss.name", "?"),
            "t": p.get("loss.temperature"), "tau+": p.get("loss.tau_plus"), "beta": p.get("loss.beta"),
            "batch": p.get("train.global_batch_size"), "epochs": p.get("train.epochs"),
            "knn_top1": m.get("knn_top1"), "linear_top1": m.get("linear_top1"),
            "images/s": _mean([x.value for x in client.get_metric_history(run.info.run_id, "images_per_s")]),
            "run_id": run.info.run_id,
        })
    return rows
