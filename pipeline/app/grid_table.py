"""The results of a reproduce grid: a markdown table (mean ± std over seeds beside the published numbers), the same
as CSV, and the summary metrics of its MLflow parent run. A cell that failed for good is one row "failed: REASON"."""

from __future__ import annotations

import csv
import io
import statistics
from typing import Any, Optional


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def _rows(grid, results: list[dict]) -> list[dict[str, Any]]:
    """One row per method x dataset over its finished cells, then one per failed cell (records with "failed")."""
    rows = []
    for method in grid.methods:
        for dataset in grid.datasets:
            mine = [r for r in results if r["method"] == method and r["dataset"] == dataset]
            cells = [r for r in mine if "failed" not in r]
            rows.append(
                {
                    "method": method,
                    "dataset": dataset,
                    "lrs": sorted({f"{r['lr']:g}" for r in cells if r.get("lr") is not None}),
                    "knn": [r["knn_top1"] for r in cells if "knn_top1" in r],
                    "linear": [r["linear_top1"] for r in cells if "linear_top1" in r],
                    "seeds": len(cells),
                    "published": grid.published.get(method, {}).get(dataset),
                    "wall": [r["wall_s"] for r in cells if "wall_s" in r],
                }
            )
            for r in sorted((r for r in mine if "failed" in r), key=lambda r: r["seed"]):
                rows.append({"method": method, "dataset": dataset, "failed": r["failed"], "seed": r["seed"]})
    return rows


def table(grid, results: list[dict]) -> str:
    """Markdown: one row per method x dataset, mean ± std over seeds (in %), beside the published number."""
    lines = [
        f"### {grid.name}: top-1 (%) on the test split over seeds {grid.seeds}",
        "",
        "| method | dataset | lr | kNN top-1 | linear top-1 | seeds | published | wall s / cell |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in _rows(grid, results):
        if "failed" in row:
            reason = " ".join(str(row["failed"]).split()).replace("|", "/")
            lines.append(f"| {row['method']} | {row['dataset']} | seed {row['seed']} | failed: {reason} | | | | |")
            continue
        published: Optional[float] = row["published"]
        wall = f"{statistics.fmean(row['wall']):.0f}" if row["wall"] else "–"
        lines.append(
            f"| {row['method']} | {row['dataset']} | {', '.join(row['lrs']) or '–'} | {_mean_std(row['knn'])} | "
            f"{_mean_std(row['linear'])} | {row['seeds']} | {'–' if published is None else f'{published:.2f}'} | "
            f"{wall} |"
        )
    if grid.published_note:
        lines += ["", grid.published_note]
    return "\n".join(lines) + "\n"


def table_csv(grid, results: list[dict]) -> str:
    """The table's numbers as CSV (fractions, not %): mean and std per protocol, one row per failed cell."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["method", "dataset", "lr", "knn_mean", "knn_std", "linear_mean", "linear_std", "seeds", "published", "failed"]
    )

    def stats(values: list[float]) -> list[Any]:
        if not values:
            return ["", ""]
        return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]

    for row in _rows(grid, results):
        if "failed" in row:
            writer.writerow(
                [row["method"], row["dataset"], "", "", "", "", "", "", "", f"seed {row['seed']}: {row['failed']}"]
            )
            continue
        writer.writerow(
            [
                row["method"],
                row["dataset"],
                " ".join(row["lrs"]),
                *stats(row["knn"]),
                *stats(row["linear"]),
                row["seeds"],
            ]
            + ["" if row["published"] is None else row["published"], ""]
        )
    return out.getvalue()


def summary_metrics(grid, results: list[dict]) -> dict[str, float]:
    """The parent run's metrics: per method and dataset, the mean test kNN (and linear) top-1 over finished seeds."""
    metrics = {}
    for row in _rows(grid, results):
        if "failed" in row:
            continue
        for protocol in ("knn", "linear"):
            if row[protocol]:
                metrics[f"grid/{row['method']}/{row['dataset']}/{protocol}_top1"] = statistics.fmean(row[protocol])
    return metrics
