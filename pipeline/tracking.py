"""The MLflow tracker: one run on rank 0 (params, metrics, artifacts, the logged and registered encoder), a
no-op on every other rank. Writes go through the outbox, so a step never waits for the server.

The other tracking jobs live beside it: pipeline/redaction.py (secrets out of what is logged),
tracking_store.py (where the store is, whether it answers), tracking_spool.py (``hardneg runs sync``),
tracking_runs.py (``hardneg runs``). MLflow is imported by tracking.py, tracking_spool.py and tracking_runs.py
only (tests/test_boundaries.py).
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from functools import partial
from importlib import metadata
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from pipeline import console
from pipeline import outbox as outbox_mod
from pipeline.config import TrackingConfig
from pipeline.errors import HardnegError
from pipeline.redaction import redact, redact_value
from pipeline.tracking_store import default_artifact_location

if TYPE_CHECKING:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

_MAX_PARAM_LEN = 6000


class NullTracker:
    """What every rank but 0 gets: all calls do nothing."""

    run_id: Optional[str] = None

    def log_params(self, params: Mapping) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_artifact(self, local_path: str, artifact_path: Optional[str] = None) -> None: ...
    def log_artifacts(self, local_dir: str, artifact_path: str) -> None: ...
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
        """Long on purpose: MLflow's model logging, registration and aliases are one transaction with its fallbacks."""
        return None

    def describe(self, tags: Mapping[str, str], note: str) -> None: ...
    def log_dataset(self, dataset: Mapping[str, str], context: str = "train") -> None: ...
    def history(self, key: str) -> list[tuple[int, float]]:
        return []

    def finish(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(NullTracker):
    """One MLflow run; attached to when ``run_id`` is given (a resumed or restarted job logs into it)."""

    run_id: str  # always a run: created here, or the one attached to

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
        self._monitor: Optional[SystemMetricsMonitor] = None
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

        monitor = SystemMetricsMonitor(
            self.run_id,
            sampling_interval=self.cfg.system_metrics_every_s,
            resume_logging=resume,
            tracking_uri=self.cfg.uri,
        )
        monitor.start()
        self._monitor = monitor

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
        except Exception:  # noqa: BLE001 -- plots are a nicety: an unreachable store must not end a finished run
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
                console.warn(
                    f"the MLflow model was not logged: {redact_value('uri', self.cfg.uri)} is "
                    "unreachable (the encoder is in the last checkpoint)"
                )
                return None
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
