"""Which trial of a reproduce grid may start next, and what the finished ones leave on disk.

The grid's state is its cell records under <out>/<name>/cells (JSON, written atomically), so a grid stopped
anywhere resumes from them:
- ``<method>-<dataset>-s<seed>.json``: a finished cell (its test-split result);
- ``<method>-<dataset>-lr<lr>-s<seed>.val.json``: one lr candidate's kNN top-1 on the validation split;
- ``<method>-<dataset>-lr.json``: the lr chosen from those (the best validation kNN top-1; the first on a tie);
- ``<cell>.failed.json``: a cell that failed for good in the last run (a rerun tries it again).

Order of dependence: a method's seeds start only once its lr is chosen; meanwhile the other methods' trials fill
the free slots. The plan is pure bookkeeping: the scheduler (cluster/tune.py) asks ``next_trial`` and reports
``trial_finished`` / ``trial_failed``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from data_prep.atomic import write_json_atomic

DONE = "DONE"


def cell_name(method: str, dataset: str, seed: int, lr: Optional[float] = None) -> str:
    """A cell's run name: <method>-<dataset>[-lr<lr>]-s<seed>."""
    return f"{method}-{dataset}-s{seed}" if lr is None else f"{method}-{dataset}-lr{lr:g}-s{seed}"


def val_trial_id(method: str, dataset: str, seed: int, lr: float) -> str:
    """The trial that scores one lr candidate on the validation split (its run is the candidate's cell name)."""
    return cell_name(method, dataset, seed, lr) + "-val"


def read_json(path: str) -> Optional[dict]:
    """The record at ``path``, or None when there is none."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


@dataclass
class _Pair:
    """One (method, dataset): its lr candidates and seeds, and how far they got."""

    method: str
    dataset: str
    candidates: list[float]
    seeds: list[int]
    scores: dict[float, float] = field(default_factory=dict)  # candidate -> validation kNN top-1
    failed: dict[float, str] = field(default_factory=dict)  # candidate -> reason, this run
    chosen: Optional[float] = None
    resolved: bool = False  # the lr is chosen (or there are no candidates)
    no_lr: Optional[str] = None  # why no candidate could be chosen


class GridPlan:
    """The trials of a grid in dependence order; ``make_spec(kind, method, dataset, seed, lr)`` builds one."""

    def __init__(
        self,
        methods: list[str],
        datasets: list[str],
        seeds: list[int],
        lrs: dict[str, list[float]],
        cells_dir: str,
        make_spec: Callable[..., dict],
        only: Optional[int] = None,
        on_event: Callable[[str, dict], None] = lambda kind, record: None,
    ) -> None:
        self.cells_dir, self.make_spec, self.only, self.on_event = cells_dir, make_spec, only, on_event
        self.pairs = [_Pair(m, d, list(lrs.get(m, [])), list(seeds)) for m in methods for d in datasets]
        self.running: dict[str, tuple[str, _Pair, int, Optional[float]]] = {}  # id -> (kind, pair, seed, lr)
        self.started: set[str] = set()
        self.seed_cells_started = 0
        self.finished_now = 0
        self.total_now = 0  # trials this run will start (known once every lr is chosen; see remaining())
        for pair in self.pairs:
            self._load(pair)

    # --- records -----------------------------------------------------------------------------------------------
    def path(self, name: str) -> str:
        return os.path.join(self.cells_dir, name)

    def _load(self, pair: _Pair) -> None:
        if not pair.candidates:
            pair.resolved = True
            return
        choice = read_json(self.path(f"{pair.method}-{pair.dataset}-lr.json"))
        if choice is not None:
            pair.chosen, pair.resolved = choice["chosen_lr"], True
            return
        for lr in pair.candidates:
            record = read_json(self.path(cell_name(pair.method, pair.dataset, pair.seeds[0], lr) + ".val.json"))
            if record is not None:
                pair.scores[lr] = record["val_knn_top1"]
        self._maybe_choose(pair)

    def _maybe_choose(self, pair: _Pair) -> None:
        """Choose the lr once every candidate has a score or failed for good."""
        if pair.resolved or any(lr not in pair.scores and lr not in pair.failed for lr in pair.candidates):
            return
        pair.resolved = True
        if not pair.scores:
            first = next(iter(pair.failed.items()))
            pair.no_lr = f"no lr candidate finished (lr {first[0]:g}: {first[1]})"
            return
        scored = [lr for lr in pair.candidates if lr in pair.scores]
        pair.chosen = max(scored, key=lambda lr: (pair.scores[lr], -pair.candidates.index(lr)))
        write_json_atomic(
            self.path(f"{pair.method}-{pair.dataset}-lr.json"),
            {
                "method": pair.method,
                "dataset": pair.dataset,
                "val_knn_top1": {f"{k:g}": v for k, v in pair.scores.items()},
                "chosen_lr": pair.chosen,
                "chosen_on": f"knn_top1 on the validation split, seed {pair.seeds[0]}",
                **({"failed": {f"{k:g}": v for k, v in pair.failed.items()}} if pair.failed else {}),
            },
            indent=2,
        )
        self.on_event("lr", {"method": pair.method, "dataset": pair.dataset, "lr": pair.chosen, "scores": pair.scores})

    def cell_done(self, pair: _Pair, seed: int) -> bool:
        return os.path.exists(self.path(cell_name(pair.method, pair.dataset, seed) + ".json"))

    # --- what the scheduler asks -------------------------------------------------------------------------------
    def _budget_left(self) -> bool:
        return self.only is None or self.seed_cells_started < self.only

    def _start(self, kind: str, pair: _Pair, seed: int, lr: Optional[float]) -> dict:
        trial_id = (
            val_trial_id(pair.method, pair.dataset, seed, lr)
            if kind == "lr"
            else cell_name(pair.method, pair.dataset, seed)
        )
        spec = self.make_spec(kind, pair.method, pair.dataset, seed, lr) | {"id": trial_id}
        self.running[spec["id"]] = (kind, pair, seed, lr)
        self.started.add(spec["id"])
        if kind == "seed":
            self.seed_cells_started += 1
        return spec

    def next_trial(self) -> Any:
        """The next startable trial's spec, None while the startable ones all run, DONE when nothing is left."""
        for pair in self.pairs:
            if not pair.resolved:
                for lr in pair.candidates:
                    name = val_trial_id(pair.method, pair.dataset, pair.seeds[0], lr)
                    if lr not in pair.scores and lr not in pair.failed and name not in self.started:
                        if self._budget_left():
                            return self._start("lr", pair, pair.seeds[0], lr)
                continue
            for seed in pair.seeds:
                name = cell_name(pair.method, pair.dataset, seed)
                if name in self.started or self.cell_done(pair, seed):
                    continue
                if pair.no_lr is not None:  # its seeds cannot run: each fails in one line
                    self.started.add(name)
                    self._fail_cell(pair, seed, pair.chosen, pair.no_lr, attempts=0)
                    continue
                if self._budget_left():
                    return self._start("seed", pair, seed, pair.chosen)
        return DONE if not self.running else None

    def remaining(self) -> int:
        """Trials still to finish this run: running, then startable within --max-cells (lr candidates, cells)."""
        candidates = cells = 0
        for pair in self.pairs:
            if not pair.resolved:
                candidates += sum(
                    1
                    for lr in pair.candidates
                    if lr not in pair.scores
                    and lr not in pair.failed
                    and val_trial_id(pair.method, pair.dataset, pair.seeds[0], lr) not in self.started
                )
            cells += sum(
                1
                for s in pair.seeds
                if cell_name(pair.method, pair.dataset, s) not in self.started and not self.cell_done(pair, s)
            )
        if self.only is not None:
            cells = min(cells, max(0, self.only - self.seed_cells_started))
        return len(self.running) + candidates + cells

    def trial_finished(self, trial_id: str, result: dict) -> None:
        """Record a finished trial: a candidate's validation score (then maybe the lr choice), or a cell."""
        kind, pair, seed, lr = self.running.pop(trial_id)
        self.finished_now += 1
        if kind == "lr":
            write_json_atomic(self.path(cell_name(pair.method, pair.dataset, seed, lr) + ".val.json"), result, indent=2)
            pair.scores[lr] = result["val_knn_top1"]
            self.on_event("val", result)
            self._maybe_choose(pair)
            return
        write_json_atomic(self.path(f"{trial_id}.json"), result, indent=2)
        failed = self.path(f"{trial_id}.failed.json")
        if os.path.exists(failed):
            os.remove(failed)
        self.on_event("cell", result)

    def trial_failed(self, trial_id: str, reason: str, attempts: int) -> None:
        """A trial failed for good: a candidate drops out of the lr choice; a cell gets a failure record."""
        kind, pair, seed, lr = self.running.pop(trial_id)
        self.finished_now += 1
        if kind == "lr":
            pair.failed[lr] = reason
            self.on_event("val_failed", {"cell": trial_id, "reason": reason, "attempts": attempts})
            self._maybe_choose(pair)
            return
        self._fail_cell(pair, seed, lr, reason, attempts)

    def _fail_cell(self, pair: _Pair, seed: int, lr: Optional[float], reason: str, attempts: int) -> None:
        record = {
            "method": pair.method,
            "dataset": pair.dataset,
            "seed": seed,
            "lr": lr,
            "cell": cell_name(pair.method, pair.dataset, seed),
            "failed": reason,
            "attempts": attempts,
            "ended_at": time.time(),
        }
        write_json_atomic(self.path(record["cell"] + ".failed.json"), record, indent=2)
        self.on_event("failed", record)
