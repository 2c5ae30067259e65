"""Experiment tracking: the only importer of mlflow. A real tracker on rank 0, a no-op elsewhere.

Secrets never reach the store as params or tags: values under secret-looking keys, credentials
inside URLs and access-key-shaped strings are redacted before logging (see ``redact``).
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import re
import shutil
import sys
import time
from functools import partial
from importlib import metadata
from typing import Any, Mapping, Optional, Sequence

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from pipeline import console
from pipeline import outbox as outbox_mod
from pipeline.config import TrackingConfig
from pipeline.errors import HardnegError

_MAX_PARAM_LEN = 6000
REDACTED = "***"
_SECRET_KEY = re.compile(
    r"(secret|token|passw(or)?d|pwd|api[_-]?key|access[_-]?key|credential|private[_-]?key|auth)", re.IGNORECASE
)
_URL_CREDENTIALS = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^/@:\s]*):(?P<password>[^/@\s]+)@", re.IGNORECASE
)
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
        return "sqlite:///" + os.path.abspath(os.path.join(base_dir, uri[len("sqlite:///") :]))
    return uri


def local_store_path(uri: str) -> Optional[str]:
    """The local file (SQLite) or directory (file store) a tracking URI names, or None for a server."""
    if uri.startswith("sqlite:///"):
        return uri[len("sqlite:///") :] or None
    if uri.startswith("file://"):
        return uri[len("file://") :] or None
    return None if "://" in uri else uri


def check_store_path(cfg: TrackingConfig) -> None:
    """A local tracking store (sqlite:///FILE, file://DIR) can be created where the URI says: its nearest
    existing ancestor is a writable directory and the store is not the wrong kind of file. HardnegError else,
    before any run or run folder exists (MLflow would raise FileExistsError from its own makedirs)."""
    path = local_store_path(cfg.uri) if cfg.enabled else None
    if path is None:
        return
    sqlite = cfg.uri.startswith("sqlite:")
    if sqlite and os.path.isdir(path):
        raise HardnegError(
            f"tracking.uri={cfg.uri}: {path} is a directory; name a database file in it, e.g. {path}/mlflow.db"
        )
    if not sqlite and os.path.exists(path) and not os.path.isdir(path):
        raise HardnegError(f"tracking.uri={cfg.uri}: {path} is a file; a file store needs a directory")
    parent = os.path.dirname(os.path.abspath(path)) if sqlite else os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise HardnegError(
            f"tracking.uri={cfg.uri}: {parent} is a file, not a directory, so the store cannot be created under it"
        )
    if not os.access(parent, os.W_OK | os.X_OK) and not (sqlite and os.access(path, os.W_OK)):
        raise HardnegError(f"tracking.uri={cfg.uri}: cannot write in {parent} (permission denied)")


def default_artifact_location(cfg: TrackingConfig) -> Optional[str]:
    """Where a new experiment's artifacts go: tracking.artifact_location, else beside a SQLite file."""
    if cfg.artifact_location:
        return cfg.artifact_location
    if cfg.uri.startswith("sqlite:///"):
        db_dir = os.path.dirname(cfg.uri[len("sqlite:///") :]) or "."
        return "file://" + os.path.abspath(os.path.join(db_dir, "mlartifacts", cfg.experiment))
    return None  # a tracking server decides (its --artifacts-destination)


def ui_command(uri: str) -> str:
    """The shell command that opens the MLflow UI on ``uri``'s store, bound to localhost."""
    if uri.startswith(("http://", "https://")):
        return f"open {redact_value('uri', uri)} in a browser"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def run_context() -> dict[str, str]:
    """Params describing where a run ran: package versions, hardware (the commit is a source tag: run_info)."""
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
    return context


class NullTracker:
    """What every rank but 0 gets: all calls do nothing."""

    run_id: Optional[str] = None

    def log_params(self, params: Mapping) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_artifact(self, local_path: str, artifact_path: Optional[str] = None) -> None: ...
    def log_artifacts(self, local_dir: str, artifact_path: str) -> None: ...
    def log_model(self, module, name: str, example, **described) -> Optional[str]: ...
    def describe(self, tags: Mapping[str, str], note: str) -> None: ...
    def log_dataset(self, dataset: Mapping[str, str], context: str = "train") -> None: ...
    def history(self, key: str) -> list[tuple[int, float]]:
        return []

    def finish(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(NullTracker):
    """One MLflow run; attached to when ``run_id`` is given (a resumed or restarted job logs into it)."""

    def __init__(
        self,
        cfg: TrackingConfig,
        run_id: Optional[str] = None,
        system_metrics: bool = False,
        spool_dir: Optional[str] = None,
    ):
        self.cfg = cfg
        self.client = MlflowClient(tracking_uri=cfg.uri)
        self.outbox: Optional[outbox_mod.Outbox] = None
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
                self.last_steps = {
                    k: max((m.step for m in self.client.get_metric_history(run_id, k)), default=-1) for k in keys
                }
            else:
                experiment = self.client.get_experiment_by_name(cfg.experiment)
                if experiment is None:
                    experiment_id = self.client.create_experiment(
                        cfg.experiment, artifact_location=default_artifact_location(cfg)
                    )
                else:
                    experiment_id = experiment.experiment_id
                self.run_id = self.client.create_run(
                    experiment_id, run_name=redact_value("run_name", cfg.run_name)
                ).info.run_id
        except mlflow.exceptions.MlflowException as e:
            raise HardnegError(f"MLflow store {redact_value('uri', cfg.uri)}: {str(e).splitlines()[0]}") from None
        if system_metrics and cfg.system_metrics_every_s > 0:
            self._start_system_metrics(resume=run_id is not None)
        if spool_dir is not None:  # training: every write goes through the outbox, never blocking a step
            self.outbox = outbox_mod.Outbox(partial(send_record, self.client), spool_dir, redact_value("uri", cfg.uri))
            outbox_mod.write_target(spool_dir, redact_value("uri", cfg.uri), self.run_id)

    def _start_system_metrics(self, resume: bool) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(
            self.run_id,
            sampling_interval=self.cfg.system_metrics_every_s,
            resume_logging=resume,
            tracking_uri=self.cfg.uri,
        )
        self._monitor.start()

    def log_params(self, params: Mapping) -> None:
        """Log params once, redacted; already-logged ones are skipped (MLflow params are immutable)."""
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in redact(params).items() if k not in existing]
        for start in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[start : start + 100])

    def _post(self, record: dict) -> None:
        """Send ``record`` (see send_record) through the outbox when there is one, else now."""
        record = record | {"run_id": self.run_id}
        if self.outbox is not None:
            if "local_path" in record:
                record["staged"] = self.outbox.stage(record.pop("local_path"))
            self.outbox.put(record)
        else:
            send_record(self.client, record)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._post({"kind": "batch", "tags": [[k, str(v)] for k, v in redact(tags).items()]})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log at ``step``; a metric's steps at or before the last one an earlier attempt stored are skipped."""
        now = int(time.time() * 1000)
        batch = [[k, float(v), now, step] for k, v in metrics.items() if step > self.last_steps.get(k, -1)]
        if batch:
            self._post({"kind": "batch", "metrics": batch})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._post({"kind": "text", "text": text, "artifact_file": artifact_file})

    def log_artifact(self, local_path: str, artifact_path: Optional[str] = None) -> None:
        self._post({"kind": "artifact", "local_path": local_path, "artifact_path": artifact_path})

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        self._post({"kind": "artifacts", "local_path": local_dir, "artifact_path": artifact_path})

    def history(self, key: str) -> list[tuple[int, float]]:
        """[(step, value)] of one metric, in step order (what the store holds; [] when it is unreachable)."""
        try:
            if self.outbox is not None and not self.outbox.flush(self.cfg.flush_timeout_s):
                return []
            return sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, key))
        except Exception:  # plots are a nicety: an unreachable store must not end a finished run
            return []

    def describe(self, tags: Mapping[str, str], note: str) -> None:
        """Tags (method, dataset, MLflow's source/git tags ...) and the run's description (MLflow's note)."""
        self.set_tags(dict(tags) | {"mlflow.note.content": note})

    def log_dataset(self, dataset: Mapping[str, str], context: str = "train") -> None:
        """The training data as an MLflow dataset input: name, digest, source, schema, profile (counts)."""
        entity = Dataset(
            name=dataset["name"],
            digest=dataset["digest"],
            source_type=dataset["source_type"],
            source=redact_value("source", dataset["source"]),
            schema=dataset.get("schema"),
            profile=dataset.get("profile"),
        )
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(entity, [InputTag("mlflow.data.context", context)])])

    def log_model(
        self,
        module,
        name: str,
        example,
        step: int = 0,
        link_metrics: Sequence[str] = (),
        description: Optional[str] = None,
        aliases: Sequence[str] = (),
        tags: Optional[Mapping[str, str]] = None,
        knn_top1: Optional[float] = None,
    ) -> Optional[str]:
        """Log ``module`` as an MLflow PyTorch model at ``step``; returns the registered version (or None).

        The model is a ``torch.export`` program (MLflow's "pt2": loading it unpickles no code) traced in eval mode
        with a dynamic batch dimension, so it runs on any batch size; ``example`` must have a batch of 2 or more
        (torch.export makes a batch of 1 static). The run's values of ``link_metrics`` at ``step`` become the
        logged model's metrics (re-logged with the same timestamp, so the run's own history gets no duplicate).
        When tracking.registered_model is set, the new version gets ``description``, ``aliases`` and a
        ``knn_top1`` tag, and the alias "best" moves to the version with the highest ``knn_top1`` of all.
        """
        if example.shape[0] < 2:
            raise ValueError(f"example batch {example.shape[0]}; expected >= 2 so that the batch stays dynamic")
        import mlflow.pytorch
        from mlflow.models import infer_signature

        with_grad_off = module.training
        module.eval()
        try:
            import torch

            with torch.no_grad():
                output = module(example)
            signature = infer_signature(example.numpy(), output.numpy())
            if self.outbox is not None and not self.outbox.flush(self.cfg.flush_timeout_s):
                print(
                    f"hardneg: warning: the MLflow model was not logged: {redact_value('uri', self.cfg.uri)} is "
                    "unreachable (the encoder is in the last checkpoint)",
                    file=sys.stderr,
                    flush=True,
                )
                return
            mlflow.set_tracking_uri(self.cfg.uri)
            # the registry prints "Successfully registered model ..." straight to stderr: console noise
            quiet = contextlib.nullcontext() if console.is_verbose() else contextlib.redirect_stderr(io.StringIO())
            with mlflow.start_run(run_id=self.run_id), quiet:
                info = mlflow.pytorch.log_model(
                    module,
                    name=name,
                    signature=signature,
                    registered_model_name=self.cfg.registered_model,
                    input_example=example.numpy(),
                    serialization_format="pt2",  # never pickle: a loaded model must run no one's code
                    step=step,
                    tags=dict(tags or {}),
                    pip_requirements=[
                        f"torch=={metadata.version('torch')}",
                        f"torchvision=={metadata.version('torchvision')}",
                    ],
                )
        finally:
            module.train(with_grad_off)
        linked = [
            Metric(m.key, m.value, m.timestamp, m.step, model_id=info.model_id)
            for key in link_metrics
            for m in self.client.get_metric_history(self.run_id, key)
            if m.step == step
        ]
        if linked:
            self.client.log_batch(self.run_id, metrics=linked)
        version = getattr(info, "registered_model_version", None)
        if self.cfg.registered_model and version is not None:
            version = str(version)
            name = self.cfg.registered_model
            if self.client.get_registered_model(name).description != REGISTRY_DESCRIPTION:
                self.client.update_registered_model(name, description=REGISTRY_DESCRIPTION)
            if description:
                self.client.update_model_version(name, version, description=description)
            self.client.set_model_version_tag(name, version, "step", str(step))
            if knn_top1 is not None:
                self.client.set_model_version_tag(name, version, "knn_top1", f"{knn_top1:.6f}")
            for alias in aliases:
                self.client.set_registered_model_alias(name, alias, version)
            best = best_version(self.client, name)
            if best is not None:
                self.client.set_registered_model_alias(name, "best", best)
            return version
        return None

    def finish(self, status: str = "FINISHED") -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        self._post({"kind": "terminated", "status": status})
        if self.outbox is not None:
            box, self.outbox = self.outbox, None
            kept = box.close(self.cfg.flush_timeout_s)
            if kept:
                outbox_mod.warn_spooled(kept, box.describe, os.path.dirname(box.spool_dir.rstrip("/")))


REGISTRY_DESCRIPTION = (
    "Backbones pretrained by hardneg, as torch.export programs in eval mode (any batch size; call the model "
    "directly, .eval() is not needed and export programs refuse it). Aliases: best = the version with the highest "
    "kNN top-1 (tag knn_top1, on its run's monitor split) across all versions; last = the final weights of the "
    "newest run; last-run-best = the best weights of the newest run (its train.best_by). Each version's "
    "description names its run, method, dataset and step."
)


def best_version(client: MlflowClient, name: str) -> Optional[str]:
    """The version of registered model ``name`` with the highest ``knn_top1`` tag (the newest on a tie), or None."""
    scored = []
    for mv in client.search_model_versions(f"name='{name}'"):
        try:
            scored.append((float(mv.tags["knn_top1"]), int(mv.version)))
        except (KeyError, ValueError):  # versions logged without a kNN (no monitor split) are not candidates
            continue
    return str(max(scored)[1]) if scored else None


def send_record(client: MlflowClient, record: dict) -> None:
    """Send one outbox record (JSON-able: it may come back from the spool) to the store behind ``client``."""
    run_id, kind = record["run_id"], record["kind"]
    if kind == "batch":
        client.log_batch(
            run_id,
            metrics=[Metric(k, v, t, s) for k, v, t, s in record.get("metrics", [])],
            params=[Param(k, v) for k, v in record.get("params", [])],
            tags=[RunTag(k, v) for k, v in record.get("tags", [])],
        )
    elif kind == "text":
        client.log_text(run_id, record["text"], record["artifact_file"])
    elif kind == "artifact":
        client.log_artifact(run_id, record["staged"], record["artifact_path"])
    elif kind == "artifacts":
        client.log_artifacts(run_id, record["staged"], record["artifact_path"])
    elif kind == "terminated":
        client.set_terminated(run_id, status=record["status"])


def sync_spool(path: str, uri: Optional[str] = None) -> dict:
    """Upload what a run could not send (``hardneg runs sync RUN_DIR``); metric steps already stored are skipped."""
    spool = (
        path if os.path.basename(path.rstrip("/")) == outbox_mod.SPOOL_DIR else os.path.join(path, outbox_mod.SPOOL_DIR)
    )
    target = outbox_mod.read_target(spool)
    records = outbox_mod.read_spool(spool)
    if not records:
        raise HardnegError(f"nothing to upload: no {outbox_mod.SPOOL_DIR}/{outbox_mod.RECORDS_FILE} under {path}")
    uri = uri or target.get("uri")
    if not uri or REDACTED in uri:
        raise HardnegError(f"the spool under {path} does not name a usable tracking URI; pass --tracking-uri")
    client = MlflowClient(tracking_uri=uri)
    stored: dict[tuple[str, str], set[int]] = {}
    sent = {"records": 0, "metric_steps": 0}
    try:
        for record in records:
            if record["kind"] == "batch" and record.get("metrics"):
                fresh = []
                for k, v, t, s in record["metrics"]:
                    key = (record["run_id"], k)
                    if key not in stored:
                        stored[key] = {m.step for m in client.get_metric_history(record["run_id"], k)}
                    if s not in stored[key]:
                        fresh.append([k, v, t, s])
                        stored[key].add(s)
                sent["metric_steps"] += len(fresh)
                record = record | {"metrics": fresh}
            send_record(client, record)
            sent["records"] += 1
    except mlflow.exceptions.MlflowException as e:
        raise HardnegError(
            f"MLflow store {redact_value('uri', uri)}: {str(e).splitlines()[0]}; "
            f"{sent['records']} of {len(records)} records sent, rerun to send the rest"
        ) from None
    except Exception as e:  # unreachable server: keep the spool for a rerun
        raise HardnegError(
            f"cannot reach {redact_value('uri', uri)} ({type(e).__name__}); "
            f"{sent['records']} of {len(records)} records sent, rerun to send the rest"
        ) from None
    shutil.rmtree(spool)
    return sent | {"uri": redact_value("uri", uri)}


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
        response = requests.get(
            f"{cfg.uri.rstrip('/')}/api/2.0/mlflow/experiments/search",
            params={"max_results": 1},
            auth=auth,
            timeout=timeout_s,
        )
    except requests.RequestException as e:
        raise HardnegError(
            f"tracking.uri={uri}: no MLflow server answers ({type(e).__name__}); start it or fix the URI"
        ) from None
    if response.status_code == 401:
        if auth is None:
            missing = " and ".join(name for name in CREDENTIAL_VARS if not environ.get(name))
            raise HardnegError(
                f"tracking.uri={uri} asks for credentials (HTTP 401) and {missing} is not set; "
                f"export both for your MLflow account"
            )
        raise HardnegError(
            f"tracking.uri={uri} refused MLFLOW_TRACKING_USERNAME={user} (HTTP 401): wrong user "
            f"name or MLFLOW_TRACKING_PASSWORD"
        )
    if response.status_code == 403:
        raise HardnegError(
            f"tracking.uri={uri}: MLFLOW_TRACKING_USERNAME={user} may not read experiments (HTTP 403); "
            f"ask the server's admin for access"
        )
    if not response.ok:
        raise HardnegError(
            f"tracking.uri={uri}: the server answered HTTP {response.status_code} to an experiment "
            f"search; is it an MLflow tracking server?"
        )


def create_run(cfg: TrackingConfig) -> str:
    """Create the run up front (the launcher does this) so every restarted worker attaches to it."""
    return MlflowTracker(cfg).run_id


def make_tracker(
    cfg: TrackingConfig, is_main: bool, run_id: Optional[str] = None, spool_dir: Optional[str] = None
) -> NullTracker:
    """MlflowTracker (with system metrics; writing through an outbox spooling into ``spool_dir`` when
    given) on the main rank when tracking is enabled, else NullTracker."""
    if is_main and cfg.enabled:
        return MlflowTracker(cfg, run_id, system_metrics=True, spool_dir=spool_dir)
    return NullTracker()


def _mean(values: list[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def _metric(client: MlflowClient, run, name: str, reduce=None) -> Optional[float]:
    """A metric by its grouped name, else by its pre-grouping name (older stores); ``reduce`` over its history."""
    from pipeline.metric_names import LEGACY

    for key in (name, LEGACY.get(name)):
        if key and key in run.data.metrics:
            if reduce is None:
                return run.data.metrics[key]
            return reduce([m.value for m in client.get_metric_history(run.info.run_id, key)])
    return None


def runs_table(uri: str, experiment: str) -> list[dict[str, Any]]:
    """One row per run of ``experiment`` (newest first): who, when, what method with which settings, and scores.

    Keys are the column headers of ``hardneg runs``; numbers stay numbers (pipeline.app.runs_view formats them).
    """
    from pipeline.config import own_loss_keys

    if uri.startswith("sqlite:///") and not os.path.isfile(uri[len("sqlite:///") :]):
        # MlflowClient would create an empty store there: a read-only command must not
        raise HardnegError(f"no MLflow store at {uri[len('sqlite:///') :]} (from --tracking-uri {uri})")
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise HardnegError(f"no experiment '{experiment}' in {redact_value('uri', uri)}; experiments: {names}")
    rows = []
    for run in client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"]):
        p, tags, info = run.data.params, run.data.tags, run.info
        method = tags.get("method") or p.get("loss.name", "?")
        own = own_loss_keys(p.get("loss.name") or method)  # the tag may be a label: moco_v2 is loss.name=mochi
        settings = [(k, p[f"loss.{k}"]) for k in own if f"loss.{k}" in p]
        last_knn = _metric(client, run, "eval/knn_top1")
        best_knn = _metric(client, run, "eval/knn_top1_best")
        best_knn = _metric(client, run, "eval/knn_top1", max) if best_knn is None else best_knn
        rows.append(
            {
                "run": info.run_name,
                "run id": info.run_id,
                "method": method,
                "dataset": tags.get("dataset") or os.path.basename(p.get("data.path", "").rstrip("/")) or None,
                "started": info.start_time / 1000.0 if info.start_time else None,
                # time in the step loop, not the run's wall span (a resume's gap, a later eval --track)
                "train time": _metric(client, run, "perf/train_seconds"),
                "temperature": p.get("loss.temperature"),
                "settings": " ".join(f"{k}={v}" for k, v in settings) or None,
                "batch": p.get("train.global_batch_size"),
                "epochs": p.get("train.epochs"),
                "best kNN": best_knn,
                "last kNN": last_knn,
                "probe top-1": _metric(client, run, "eval/probe_top1"),
                "train images/s (mean)": _metric(client, run, "perf/images_per_s", _mean),
                "status": info.status,
            }
        )
    return rows
