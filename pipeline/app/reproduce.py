"""`hardneg reproduce GRID.yaml`: pretrain + evaluate a (method x dataset x seed) grid as Ray Tune trials, then tabulate.

Every cell is a Tune trial (cluster/tune.py) that trains through train_run (a TorchTrainer with the workers its
config asks for, or one process with cluster.launcher=local) and then evaluates; as many run at once as the
cluster holds, bounded by --max-concurrent, on the private local Ray or a cluster (--address, or as a Ray Job).
Each finished cell leaves a JSON record (pipeline/app/grid_plan.py); a rerun skips those, resumes a cell whose
training was interrupted from its checkpoint, and evaluates a cell that trained but was not evaluated. A trial
that raises is retried (cluster.max_failures) from its own last checkpoint; one that fails for good is one row
"failed: REASON" and the other cells go on. The table puts mean ± std beside the published numbers; MLflow gets
one parent run per grid with every cell a child (pipeline/tracking_grid.py).

Learning rates: ``lrs`` lists candidate optim.lr values per method. Each candidate trains once (the
first seed) and is scored by kNN top-1 on the validation split (data.val_split, held out of train by
`hardneg prep --val-fraction`); the best one then runs every seed, and only those are evaluated on the
test split; meanwhile the other methods' cells fill the free slots. The choice is stored in
cells/<method>-<dataset>-lr.json. No test number picks anything.
"""

from __future__ import annotations

import os
import time
from functools import partial
from typing import Literal, Optional, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from data_prep.atomic import write_atomic
from data_prep.manifest import read_manifest
from pipeline import checkpoint, console, data
from pipeline import config as config_mod
from pipeline.app import grid_table, train_command
from pipeline.app.grid_plan import GridPlan, cell_name, read_json
from pipeline.app.train_command import train_run
from pipeline.errors import HardnegError
from pipeline.evaluate import evaluate_checkpoint
from pipeline.tracking_grid import log_grid_results, parent_run
from pipeline.tracking_store import check_store_path
from pipeline.train import planned_steps


class Grid(BaseModel):
    """The grid file: which configs, data and seeds, and the published numbers to compare with."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str  # MLflow experiment and output folder name
    out: str = "results"  # the grid's folder: <out>/<name>/{cells,runs,table.md}
    datasets: dict[str, str]  # dataset name -> prepared shards (hardneg prep OUT)
    methods: dict[str, str]  # method name -> config file
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    overrides: list[str] = Field(default_factory=list)  # applied to every cell, after its config
    protocol: Literal["knn", "linear", "all"] = "all"
    published: dict[str, dict[str, float]] = Field(default_factory=dict)  # method -> dataset -> top-1 (%)
    published_note: str = ""
    lrs: dict[str, list[float]] = Field(default_factory=dict)  # method -> optim.lr candidates, chosen on val
    method_overrides: dict[str, list[str]] = Field(default_factory=dict)  # method -> overrides after the grid's


def load_grid(path: str) -> Grid:
    """Read and validate a grid file (HardnegError naming the problem)."""
    if not os.path.isfile(path):
        raise HardnegError(f"grid file not found: {path}")
    with open(path, encoding="utf-8") as f:
        raw = yaml.load(f, Loader=config_mod._StrictLoader)
    try:
        grid = Grid.model_validate(raw or {})
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "grid"
        raise HardnegError(f"invalid grid {path}: {key}: {first['msg']}") from None
    base = os.path.dirname(os.path.abspath(path))
    found = {}
    for name, config_path in grid.methods.items():
        beside = os.path.join(base, config_path)
        if not os.path.isfile(config_path) and not os.path.isfile(beside):
            raise HardnegError(f"grid {path}: config of method '{name}' not found: {config_path}")
        found[name] = config_path if os.path.isfile(config_path) else beside  # as given, else beside the grid
    return grid.model_copy(update={"methods": found})


def _cell_config(
    grid: Grid,
    method: str,
    dataset: str,
    seed: int,
    root: str,
    lr: Optional[float] = None,
    extra: Sequence[str] = (),
) -> config_mod.Config:
    """A cell's config: its method's file, then the grid's and the method's overrides, its seed and lr."""
    cell = cell_name(method, dataset, seed, lr)
    return config_mod.load(
        grid.methods[method],
        [
            f"data.path={grid.datasets[dataset]}",
            f"train.seed={seed}",
            f"tracking.experiment={grid.name}",
            f"tracking.run_name={cell}",
            f"cluster.storage_path={os.path.join(root, 'runs')}",
            *grid.overrides,
            *grid.method_overrides.get(method, []),
            *([f"optim.lr={lr}"] if lr is not None else []),
            *extra,
        ],
    )


def cell_configs(
    grid: Grid, root: str, extra: Sequence[str] = (), methods: Optional[Sequence[str]] = None
) -> list[config_mod.Config]:
    """The first seed's config of every method x dataset x lr candidate: what the grid's cells ask for."""
    return [
        _cell_config(grid, m, d, grid.seeds[0], root, lr, extra)
        for m in (methods or list(grid.methods))
        for d in grid.datasets
        for lr in (grid.lrs.get(m) or [None])
    ]


def _train_cell(cfg: config_mod.Config) -> tuple[str, dict]:
    """Train (or resume, or skip when trained) one cell; (its final checkpoint, how: resumed_from_step or
    trained_before when an earlier trial, e.g. the chosen lr candidate for the first seed, trained it)."""
    cell = cfg.tracking.run_name
    run_dir = f"{cfg.cluster.storage_path.rstrip('/')}/{cell}"  # <out>/<name>/runs/<cell> unless overridden
    spe = data.steps_per_epoch(read_manifest(cfg.data.path), cfg.data.pretrain, cfg.train.global_batch_size)
    total = planned_steps(cfg, spe)
    found = checkpoint.latest(run_dir)
    how: dict = {"resumed_from_step": None}
    if found is None:
        train_run(cfg)
    else:
        step = checkpoint.load(found)["step"]
        if step < total:
            train_run(cfg, resume=cell)
            how["resumed_from_step"] = step
        else:
            how["trained_before"] = True
    return checkpoint.latest(run_dir), how


def _as_child(cfg: config_mod.Config, parent_run_id: Optional[str], kind: str) -> config_mod.Config:
    """The cell's MLflow run as a child of the grid's parent (made here unless its checkpoint already names one)."""
    if parent_run_id is None or not cfg.tracking.enabled:
        return cfg
    if checkpoint.latest(f"{cfg.cluster.storage_path.rstrip('/')}/{cfg.tracking.run_name}") is not None:
        return cfg  # the run its checkpoint names, made a child when it started
    from pipeline.tracking_grid import child_run

    run_id = child_run(cfg.tracking, parent_run_id, cfg.tracking.run_name, {"hardneg.trial": kind})
    return train_command._with(cfg, "tracking", run_id=run_id)


def cell_result(spec: dict) -> dict:
    """One trial of the grid, wherever it runs: train (or resume) its cell, then evaluate it; its record.

    ``spec``: kind ("lr": a candidate, scored by kNN top-1 on the validation split; "seed": a cell, evaluated on
    the test split), config (the cell's resolved config as a dict), protocol, parent_run_id."""
    started = time.time()
    cfg = _as_child(config_mod.from_dict(spec["config"]), spec.get("parent_run_id"), spec["kind"])
    final, how = _train_cell(cfg)
    if spec["kind"] == "lr":
        scored = evaluate_checkpoint(
            final, cfg.data.path, overrides=[f"data.eval_split={cfg.data.val_split}"], protocol="knn"
        )
        result: dict = {"val_knn_top1": scored["knn_top1"], "split": cfg.data.val_split, "step": scored["step"]}
    else:
        result = evaluate_checkpoint(final, cfg.data.path, protocol=spec["protocol"], track=True)
    return result | {
        "method": spec["method"],
        "dataset": spec["dataset"],
        "seed": spec["seed"],
        "cell": cfg.tracking.run_name,
        "lr": cfg.optim.lr,
        "wall_s": round(time.time() - started, 1),
        "started_at": started,
        "ended_at": time.time(),
        **how,
    }


def _spec(
    grid: Grid, root: str, extra: Sequence[str], parent_run_id: Optional[str], kind: str, method, dataset, seed, lr
) -> dict:
    cfg = train_command.resolve_paths(_cell_config(grid, method, dataset, seed, root, lr, extra))
    return {
        "kind": kind,
        "method": method,
        "dataset": dataset,
        "seed": seed,
        "lr": lr,
        "protocol": grid.protocol,
        "parent_run_id": parent_run_id,
        "config": config_mod.to_dict(cfg),
    }


def run_cell(grid: Grid, method: str, dataset: str, seed: int, root: str, lr: Optional[float] = None) -> dict:
    """One cell in this process, as the sequential runner ran it (the trial body, without Tune): its result."""
    return cell_result(_spec(grid, root, (), None, "seed", method, dataset, seed, lr))


def _results(grid: Grid, cells_dir: str) -> list[dict]:
    """Every finished cell's record, then every failed one's (a cell that both failed and finished: finished)."""
    results = []
    for method in grid.methods:
        for dataset in grid.datasets:
            for seed in grid.seeds:
                name = cell_name(method, dataset, seed)
                record = read_json(os.path.join(cells_dir, name + ".json")) or read_json(
                    os.path.join(cells_dir, name + ".failed.json")
                )
                if record is not None:
                    results.append(record)
    return results


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class _Progress:
    """The driver's console: one line per finished trial, with the count and an overall ETA; the partial table
    (table.md, table.csv) rewritten after every cell."""

    def __init__(self, grid: Grid, root: str) -> None:
        self.grid, self.root, self.start = grid, root, time.time()
        self.plan: Optional[GridPlan] = None

    def _eta(self) -> str:
        assert self.plan is not None
        done, left = self.plan.finished_now, self.plan.remaining()
        if left == 0:
            return f"{done} trials done, none left"
        if done == 0:
            return f"{left} trials to go"
        eta = (time.time() - self.start) / done * left  # the observed rate, concurrency included
        return f"{done} done, {left} to go, ETA {_duration(eta)}"

    def __call__(self, kind: str, record: dict) -> None:
        if kind == "cell":
            published = self.grid.published.get(record["method"], {}).get(record["dataset"])
            scores = ", ".join(f"{k} {record[k]:.4f}" for k in ("knn_top1", "linear_top1") if k in record)
            resumed = f", resumed from step {record['resumed_from_step']}" if record.get("resumed_from_step") else ""
            resumed += ", training reused" if record.get("trained_before") else ""
            line = (
                f"{record['cell']}: {scores}"
                + (f" (published {published:.2f})" if published is not None else "")
                + f" in {_duration(record['wall_s'])}{resumed}"
            )
        elif kind == "val":
            line = f"{record['cell']}: val kNN top-1 {record['val_knn_top1']:.4f} in {_duration(record['wall_s'])}"
        elif kind == "lr":
            scores = ", ".join(f"{lr:g}: {v:.4f}" for lr, v in record["scores"].items())
            line = (
                f"{record['method']}-{record['dataset']}: lr {record['lr']:g} chosen on the validation split ({scores})"
            )
        else:  # failed, val_failed
            line = f"{record['cell']}: failed after {record['attempts']} attempt(s): {record['reason'] if 'reason' in record else record['failed']}"
        print(f"[reproduce] {line} · {self._eta()}" if kind != "lr" else f"[reproduce] {line}", flush=True)
        if kind in ("cell", "failed"):
            self.write_table()

    def write_table(self) -> str:
        cells_dir = os.path.join(self.root, "cells")
        results = _results(self.grid, cells_dir)
        text = grid_table.table(self.grid, results)
        write_atomic(os.path.join(self.root, "table.md"), text)
        write_atomic(os.path.join(self.root, "table.csv"), grid_table.table_csv(self.grid, results))
        return text


def _check_cells(grid: Grid, cfgs: list[config_mod.Config]) -> None:
    """What every trial would trip over, refused once here: unreadable data, no validation split for an lr
    choice, a bad store path."""
    for cfg in cfgs:
        cfg = train_command.resolve_paths(cfg)
        check_store_path(cfg.tracking)
        train_command.check_data(cfg)
        if "-lr" in cfg.tracking.run_name and cfg.data.val_split not in read_manifest(cfg.data.path)["splits"]:
            method = cfg.tracking.run_name.rsplit("-lr", 1)[0]
            raise HardnegError(
                f"grid {grid.name}: choosing the lr of {method} needs a '{cfg.data.val_split}' split in "
                f"{cfg.data.path} (hardneg prep --val-fraction)"
            )


def reproduce(
    grid_path: str,
    only: Optional[int] = None,
    methods: Optional[list[str]] = None,
    address: Optional[str] = None,
    max_concurrent: Optional[int] = None,
    overrides: Sequence[str] = (),
    out: Optional[str] = None,
) -> str:
    """Run every unfinished cell of the grid as Ray Tune trials (at most ``only`` cells; only ``methods``' when
    given) on the private local Ray or the cluster at ``address``, at most ``max_concurrent`` at once (default:
    as many as the cluster's resources hold), ``overrides`` applied to every cell last, ``out`` in place of the
    grid file's; write and return the table (every method, from the records).

    Long on purpose: the driver's sequence (records, parent run, Tune, table, MLflow) reads best in one place.
    """
    grid = load_grid(grid_path)
    unknown = [m for m in methods or [] if m not in grid.methods]
    if unknown:
        raise HardnegError(f"grid {grid.name}: no method {', '.join(unknown)}; it has: {', '.join(grid.methods)}")
    if max_concurrent is not None and max_concurrent < 1:
        raise HardnegError(f"--max-concurrent {max_concurrent}; expected 1 or more")
    root = os.path.abspath(os.path.join(out or grid.out, grid.name))
    cells_dir = os.path.join(root, "cells")
    os.makedirs(cells_dir, exist_ok=True)
    picked = [m for m in grid.methods if not methods or m in methods]
    extra = [*overrides, *([f"cluster.address={address}"] if address else [])]
    # one config per method x dataset x lr: what the cluster must hold, and the checks done once here
    probes = cell_configs(grid, root, extra, picked)
    _check_cells(grid, probes)
    for m in picked:
        for d in grid.datasets:
            for seed in grid.seeds:
                if os.path.exists(os.path.join(cells_dir, cell_name(m, d, seed) + ".json")):
                    print(f"[reproduce] {cell_name(m, d, seed)}: done, skipped", flush=True)
    tracking = train_command.resolve_paths(probes[0]).tracking
    parent_id = parent_run(tracking, grid.name) if tracking.enabled else None
    progress = _Progress(grid, root)
    plan = GridPlan(
        picked,
        list(grid.datasets),
        grid.seeds,
        grid.lrs,
        cells_dir,
        partial(_spec, grid, root, extra, parent_id),
        only=only,
        on_event=progress,
    )
    progress.plan = plan
    status = "KILLED"
    try:
        if plan.remaining():
            _run_on_ray(plan, probes, max_concurrent)
        status = "FAILED" if any("failed" in r for r in _results(grid, cells_dir)) else "FINISHED"
    finally:
        text = progress.write_table()
        if parent_id is not None:
            results = _results(grid, cells_dir)
            log_grid_results(
                tracking,
                parent_id,
                grid_path,
                text,
                grid_table.table_csv(grid, results),
                grid_table.summary_metrics(grid, results),
                status=status,
            )
    return text


def _run_on_ray(plan: GridPlan, probes: list[config_mod.Config], max_concurrent: Optional[int]) -> None:
    """The plan's trials under Ray Tune, on the Ray the first cell's config names (a private one by default)."""
    from cluster import tune as grid_tune  # Ray is imported only under cluster/
    from cluster.train import ray_session

    # the session fits the largest cell: a private Ray gets at least its CPUs
    largest = max(probes, key=lambda c: c.cluster.num_workers * c.cluster.cpus_per_worker)
    with ray_session(largest):
        available = grid_tune.cluster_resources()
        problem = grid_tune.check_cells_fit(probes, available)
        if problem:
            raise HardnegError(problem)
        # beyond what fits now, a trial only waits for its workers (or for an autoscaler to bring them)
        concurrency = max_concurrent or grid_tune.fitting_concurrency(probes, available)
        print(
            f"[reproduce] {plan.remaining()} trials, up to {concurrency} at once "
            f"(cluster: {available.get('CPU', 0):g} CPUs, {available.get('GPU', 0):g} GPUs)",
            flush=True,
        )
        grid_tune.run_trials(
            plan,
            cell_result,
            lambda spec: grid_tune.trial_resources(config_mod.from_dict(spec["config"])),
            # Tune's own files (results, error traces) beside the cells' runs: shared storage on a cluster
            storage_path=f"{train_command.resolve_paths(probes[0]).cluster.storage_path.rstrip('/')}/.tune",
            name=time.strftime("tune-%Y%m%d-%H%M%S"),
            max_concurrent=concurrency,
            max_failures=max(c.cluster.max_failures for c in probes),
            verbose=console.is_verbose(),
        )
