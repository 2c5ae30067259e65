"""``hardneg runs``: one row per run of an experiment, read from the MLflow store."""

from __future__ import annotations

import os
from typing import Any, Optional

from mlflow.tracking import MlflowClient

from pipeline.config import own_loss_keys
from pipeline.errors import HardnegError
from pipeline.metric_names import LEGACY
from pipeline.redaction import redact_value


def _mean(values: list[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def _metric(client: MlflowClient, run, name: str, reduce=None) -> Optional[float]:
    """A metric by its grouped name, else by its pre-grouping name (older stores); ``reduce`` over its history."""
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
