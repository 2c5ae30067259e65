"""A reproduce grid in MLflow: one parent run per grid, every cell (and lr candidate) a nested child run.

The parent holds the grid file, the results table (markdown and CSV artifacts) and one summary metric per method
and dataset; a child carries MLflow's ``mlflow.parentRunId`` tag, so the UI nests it under the parent. A rerun of
the grid finds its parent (tag ``hardneg.grid``) and its children (by run name) and logs into them again.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

import mlflow
from mlflow.tracking import MlflowClient

from pipeline.config import TrackingConfig
from pipeline.errors import HardnegError
from pipeline.tracking import default_artifact_location, redact_value

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag
GRID_TAG = "hardneg.grid"  # on the parent: the grid's name
CELL_TAG = "hardneg.cell"  # on a child: its cell name


def _store_error(cfg: TrackingConfig, e: Exception) -> HardnegError:
    return HardnegError(f"MLflow store {redact_value('uri', cfg.uri)}: {str(e).splitlines()[0]}")


def _experiment_id(client: MlflowClient, cfg: TrackingConfig) -> str:
    found = client.get_experiment_by_name(cfg.experiment)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(cfg.experiment, artifact_location=default_artifact_location(cfg))


def _newest(client: MlflowClient, experiment_id: str, filter_string: str) -> Optional[str]:
    """The id of the newest run of the experiment that matches ``filter_string``, or None."""
    found = client.search_runs(
        [experiment_id], filter_string=filter_string, order_by=["attributes.start_time DESC"], max_results=1
    )
    return found[0].info.run_id if found else None


def parent_run(cfg: TrackingConfig, grid_name: str) -> str:
    """The grid's parent run in cfg.experiment (the newest one tagged with the grid's name), else a new one;
    marked RUNNING."""
    client = MlflowClient(tracking_uri=cfg.uri)
    try:
        experiment_id = _experiment_id(client, cfg)
        run_id = _newest(client, experiment_id, f"tags.`{GRID_TAG}` = '{grid_name}'")
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
            return run_id
        run = client.create_run(experiment_id, run_name=grid_name, tags={GRID_TAG: grid_name})
        return run.info.run_id
    except mlflow.exceptions.MlflowException as e:
        raise _store_error(cfg, e) from None


def child_run(cfg: TrackingConfig, parent_id: str, cell: str, tags: Mapping[str, str] = {}) -> str:
    """The parent's child run named ``cell`` (the newest, when an earlier attempt made one), else a new one."""
    client = MlflowClient(tracking_uri=cfg.uri)
    try:
        experiment_id = _experiment_id(client, cfg)
        run_id = _newest(
            client, experiment_id, f"tags.`{PARENT_TAG}` = '{parent_id}' and attributes.run_name = '{cell}'"
        )
        if run_id is not None:
            return run_id
        run = client.create_run(
            experiment_id, run_name=cell, tags={PARENT_TAG: parent_id, CELL_TAG: cell, **dict(tags)}
        )
        return run.info.run_id
    except mlflow.exceptions.MlflowException as e:
        raise _store_error(cfg, e) from None


def log_grid_results(
    cfg: TrackingConfig,
    parent_id: str,
    grid_path: Optional[str],
    table_md: str,
    table_csv: str,
    metrics: Mapping[str, float],
    status: Optional[str] = None,
) -> None:
    """The grid file, the table (table.md, table.csv) and the summary metrics into the parent; then ``status``."""
    client = MlflowClient(tracking_uri=cfg.uri)
    try:
        if grid_path and os.path.isfile(grid_path):
            client.log_artifact(parent_id, grid_path)
        client.log_text(parent_id, table_md, "table.md")
        client.log_text(parent_id, table_csv, "table.csv")
        step = len(client.get_metric_history(parent_id, next(iter(metrics)))) if metrics else 0
        for key, value in metrics.items():
            client.log_metric(parent_id, key, float(value), step=step)
        if status is not None:
            client.set_terminated(parent_id, status=status)
    except mlflow.exceptions.MlflowException as e:
        raise _store_error(cfg, e) from None


def children_of_grid(uri: str, experiment: str) -> tuple[Optional[str], set[str]]:
    """(the newest grid parent run's id, the ids of its child runs) in ``experiment``; (None, {}) without one."""
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None, set()
    parents = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{GRID_TAG}` LIKE '%'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not parents:
        return None, set()
    parent_id = parents[0].info.run_id
    children = client.search_runs([found.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'")
    return parent_id, {run.info.run_id for run in children}
