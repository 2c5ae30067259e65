"""`hardneg bench NAME`: benchmarks that print ratios measured in one run (never timed assertions).

Each benchmark is a module with ``main(argv: list[str]) -> int``; this dict is the registry.
"""

from __future__ import annotations

import importlib

BENCHES = {
    "losses": "pipeline.app.bench.losses",
    "prep": "pipeline.app.bench.prep",
    "train": "pipeline.app.bench.train",
    "step": "pipeline.app.bench.step",
    "memory": "pipeline.app.bench.memory",
    "all": "pipeline.app.bench.all",
}


def run_bench(name: str, argv: list[str]) -> int:
    """Run benchmark ``name`` with its own arguments."""
    return importlib.import_module(BENCHES[name]).main(argv)
