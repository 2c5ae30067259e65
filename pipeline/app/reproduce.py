"""`hardneg reproduce GRID.yaml`: pretrain + evaluate a (method x dataset x seed) grid, then tabulate.

Cells run one after another (each uses the workers its config asks for) on one Ray session, so a
grid on a cluster keeps every GPU busy without oversubscribing it. Each finished cell leaves a JSON
result (written atomically); a rerun skips those, resumes a cell whose training was interrupted,
and evaluates a cell that trained but was not evaluated. The table puts mean ± std beside the
published numbers.

Learning rates: ``lrs`` lists candidate optim.lr values per method. Each candidate trains once (the
first seed) and is scored by kNN top-1 on the validation split (data.val_split, held out of train by
`hardneg prep --val-fraction`); the best one then runs every seed, and only those are evaluated on the
test split. The choice is stored in cells/<method>-<dataset>-lr.json. No test number picks anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from data_prep.atomic import write_atomic, write_json_atomic
from data_prep.manifest import read_manifest
from pipeline import checkpoint, data
from pipeline import config as config_mod
from pipeline.app.train_command import train_run
from pipeline.errors import HardnegError
from pipeline.evaluate import evaluate_checkpoint
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
    for name, config_path in grid.methods.items():
        if not os.path.isfile(config_path) and not os.path.isfile(os.path.join(base, config_path)):
            raise HardnegError(f"grid {path}: config of method '{name}' not found: {config_path}")
    return grid


def _cell_name(method: str, dataset: str, seed: int, lr: Optional[float] = None) -> str:
    return f"{method}-{dataset}-s{seed}" if lr is None else f"{method}-{dataset}-lr{lr:g}-s{seed}"


def _cell_config(
    grid: Grid, method: str, dataset: str, seed: int, root: str, lr: Optional[float] = None
) -> config_mod.Config:
    cell = _cell_name(method, dataset, seed, lr)
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
        ],
    )


def _train_cell(cfg: config_mod.Config, root: str) -> tuple[str, float]:
    """Train (or resume, or skip when trained) one cell; (its final checkpoint, training seconds spent now)."""
    cell = cfg.tracking.run_name
    run_dir = os.path.join(root, "runs", cell)
    spe = data.steps_per_epoch(read_manifest(cfg.data.path), cfg.data.pretrain, cfg.train.global_batch_size)
    total = planned_steps(cfg, spe)
    found = checkpoint.latest(run_dir)
    start = time.perf_counter()
    if found is None:
        train_run(cfg)
    elif checkpoint.load(found)["step"] < total:
        print(f"[reproduce] {cell}: resuming its interrupted training", flush=True)
        train_run(cfg, resume=cell)
    return checkpoint.latest(run_dir), time.perf_counter() - start


def run_cell(grid: Grid, method: str, dataset: str, seed: int, root: str, lr: Optional[float] = None) -> dict:
    """Train (or resume, or skip when trained) then evaluate one cell on the test split; returns its result dict."""
    cfg = _cell_config(grid, method, dataset, seed, root, lr)
    start = time.perf_counter()
    final, _ = _train_cell(cfg, root)
    result = evaluate_checkpoint(final, cfg.data.path, protocol=grid.protocol, track=True)
    return result | {
        "method": method,
        "dataset": dataset,
        "seed": seed,
        "cell": cfg.tracking.run_name,
        "lr": cfg.optim.lr,
        "wall_s": round(time.perf_counter() - start, 1),
    }


def choose_lr(grid: Grid, method: str, dataset: str, root: str) -> Optional[float]:
    """The candidate lr with the best kNN top-1 on the validation split (first seed); None without candidates."""
    candidates = grid.lrs.get(method, [])
    if not candidates:
        return None
    path = os.path.join(root, "cells", f"{method}-{dataset}-lr.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)["chosen_lr"]
    scores = {}
    for lr in candidates:
        cfg = _cell_config(grid, method, dataset, grid.seeds[0], root, lr)
        if cfg.data.val_split not in read_manifest(cfg.data.path)["splits"]:
            raise HardnegError(
                f"grid {grid.name}: choosing {method}'s lr needs a '{cfg.data.val_split}' split in "
                f"{cfg.data.path} (hardneg prep --val-fraction)"
            )
        final, _ = _train_cell(cfg, root)
        scores[lr] = evaluate_checkpoint(
            final, cfg.data.path, overrides=[f"data.eval_split={cfg.data.val_split}"], protocol="knn"
        )["knn_top1"]
        print(f"[reproduce] {cfg.tracking.run_name}: val kNN top-1 {scores[lr]:.4f}", flush=True)
    chosen = max(candidates, key=lambda lr: (scores[lr], -candidates.index(lr)))
    write_json_atomic(
        path,
        {
            "method": method,
            "dataset": dataset,
            "val_knn_top1": {f"{k:g}": v for k, v in scores.items()},
            "chosen_lr": chosen,
            "chosen_on": f"knn_top1 on the validation split, seed {grid.seeds[0]}",
        },
        indent=2,
    )
    return chosen


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def table(grid: Grid, results: list[dict]) -> str:
    """Markdown: one row per method x dataset, mean ± std over seeds (in %), beside the published number."""
    lines = [
        f"### {grid.name}: top-1 (%) on the test split over seeds {grid.seeds}",
        "",
        "| method | dataset | lr | kNN top-1 | linear top-1 | seeds | published | wall s / cell |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in grid.methods:
        for dataset in grid.datasets:
            cells = [r for r in results if r["method"] == method and r["dataset"] == dataset]
            knn = [r["knn_top1"] for r in cells if "knn_top1" in r]
            linear = [r["linear_top1"] for r in cells if "linear_top1" in r]
            published = grid.published.get(method, {}).get(dataset)
            lrs = sorted({f"{r['lr']:g}" for r in cells if "lr" in r})
            wall = [r["wall_s"] for r in cells if "wall_s" in r]
            lines.append(
                f"| {method} | {dataset} | {', '.join(lrs) or '–'} | {_mean_std(knn)} | {_mean_std(linear)} | "
                f"{len(cells)} | {'–' if published is None else f'{published:.2f}'} | "
                f"{f'{statistics.fmean(wall):.0f}' if wall else '–'} |"
            )
    if grid.published_note:
        lines += ["", grid.published_note]
    return "\n".join(lines) + "\n"


def reproduce(grid_path: str, only: Optional[int] = None, methods: Optional[list[str]] = None) -> str:
    """Run every unfinished cell of the grid (at most ``only`` of them; only ``methods``' cells when given),
    write and return the table (every method of the grid, from the finished cells)."""
    grid = load_grid(grid_path)
    unknown = [m for m in methods or [] if m not in grid.methods]
    if unknown:
        raise HardnegError(f"grid {grid.name}: no method {', '.join(unknown)}; it has: {', '.join(grid.methods)}")
    root = os.path.abspath(os.path.join(grid.out, grid.name))
    cells_dir = os.path.join(root, "cells")
    os.makedirs(cells_dir, exist_ok=True)
    picked = [m for m in grid.methods if not methods or m in methods]
    todo = [(m, d, s) for m in picked for d in grid.datasets for s in grid.seeds]
    ran = 0
    first_cfg = _cell_config(grid, *todo[0], root)
    with _ray_session(first_cfg):
        for method, dataset, seed in todo:
            path = os.path.join(cells_dir, f"{method}-{dataset}-s{seed}.json")
            if os.path.exists(path):
                print(f"[reproduce] {method}-{dataset}-s{seed}: done, skipped", flush=True)
                continue
            if only is not None and ran >= only:
                break
            result = run_cell(grid, method, dataset, seed, root, choose_lr(grid, method, dataset, root))
            write_json_atomic(path, result, indent=2)
            ran += 1
            published = grid.published.get(method, {}).get(dataset)
            print(
                f"[reproduce] {result['cell']}: "
                + ", ".join(f"{k} {result[k]:.4f}" for k in ("knn_top1", "linear_top1") if k in result)
                + (f" (published {published:.2f})" if published is not None else ""),
                flush=True,
            )
    results = []
    for name in sorted(os.listdir(cells_dir)):
        if name.endswith(".json") and not name.endswith("-lr.json"):
            with open(os.path.join(cells_dir, name)) as f:
                results.append(json.load(f))
    text = table(grid, results)
    write_atomic(os.path.join(root, "table.md"), text)
    return text


@contextlib.contextmanager
def _ray_session(cfg: config_mod.Config):
    """Keep one Ray instance up for the whole grid when the cells run on Ray."""
    if cfg.cluster.launcher != "ray":
        yield
        return
    from cluster.train import ray_session  # Ray is imported only under cluster/

    with ray_session(cfg):
        yield
