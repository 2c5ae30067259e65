"""``hardneg runs`` output: the rows of tracking_runs.runs_table as an aligned text table, CSV or markdown, sorted."""

from __future__ import annotations

import csv
import io
import time
from typing import Any, Optional, Sequence

from pipeline.errors import HardnegError

COLUMNS = (
    "run",
    "run id",
    "method",
    "dataset",
    "started",
    "train time",
    "temperature",
    "settings",
    "batch",
    "epochs",
    "best kNN",
    "last kNN",
    "probe top-1",
    "train images/s (mean)",
    "status",
)
# the text table by default: what fits a 120-column terminal (`hardneg runs --wide`: every column)
NARROW = ("run", "method", "dataset", "started", "train time", "best kNN", "last kNN", "probe top-1", "status")
WIDTH = 120
FORMATS = ("text", "csv", "md")
_SCORES = ("best kNN", "last kNN", "probe top-1")


def _number(value: Any) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def cell(column: str, value: Any) -> str:
    """How one value reads: dates in UTC, durations as 1h02m / 3m05s, scores to 4 digits, no bare '-'."""
    if value is None:
        return {"probe top-1": "no probe", "best kNN": "no kNN", "last kNN": "no kNN", "train time": "unknown"}.get(
            column, ""
        )
    if column == "started":
        return time.strftime("%Y-%m-%d %H:%M", time.gmtime(value))
    if column == "train time":
        seconds = int(round(value))
        hours, rest = divmod(seconds, 3600)
        return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
    if column in _SCORES:
        return f"{value:.4f}"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def sort_rows(rows: list[dict], column: Optional[str]) -> list[dict]:
    """Rows by ``column``: numbers descending (best, newest, longest first), text ascending; empty cells last."""
    if column is None:
        return rows
    if column not in COLUMNS:
        raise HardnegError(f"--sort {column!r}; expected one of: {', '.join(COLUMNS)}")
    numeric = [r for r in rows if _number(r.get(column)) is not None]
    if len(numeric) == len([r for r in rows if r.get(column) is not None]) and column not in ("run", "run id"):
        return sorted(rows, key=lambda r: (r.get(column) is None, -(_number(r.get(column)) or 0.0)))
    return sorted(rows, key=lambda r: (r.get(column) is None, str(r.get(column))))


def grid_children(rows: list[dict], uri: str, experiment: str) -> list[dict]:
    """The rows of the child runs of the experiment's (newest) reproduce grid parent run, in the rows' order."""
    from pipeline.tracking_grid import children_of_grid

    parent_id, children = children_of_grid(uri, experiment)
    if parent_id is None:
        raise HardnegError(f"experiment '{experiment}' has no grid run (`hardneg reproduce GRID` makes one)")
    return [row for row in rows if row.get("run id") in children]


def render(rows: list[dict], fmt: str = "text", columns: Sequence[str] = COLUMNS) -> str:
    """The table as aligned text (two spaces between columns), CSV (raw values) or a markdown table."""
    if fmt not in FORMATS:
        raise HardnegError(f"--format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow(
                ["" if row.get(c) is None else cell(c, row[c]) if c in ("started",) else row[c] for c in columns]
            )
        return out.getvalue()
    table = [list(columns)] + [[cell(c, row.get(c)) for c in columns] for row in rows]
    if fmt == "md":
        lines = ["| " + " | ".join(line) + " |" for line in table]
        return "\n".join([lines[0], "|" + "---|" * len(columns)] + lines[1:]) + "\n"
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    if columns == NARROW:
        widths = _fit(table, widths, [columns.index(c) for c in ("run", "dataset")])
    return (
        "\n".join("  ".join(text.ljust(w) for text, w in zip(line, widths, strict=True)).rstrip() for line in table)
        + "\n"
    )


def _fit(table: list[list[str]], widths: list[int], shrinkable: list[int]) -> list[int]:
    """Narrow the ``shrinkable`` columns (widest first, not below 12) until the table fits WIDTH; cut cells end
    in an ellipsis."""
    widths = list(widths)
    while sum(widths) + 2 * (len(widths) - 1) > WIDTH:
        i = max(shrinkable, key=lambda j: widths[j])
        if widths[i] <= 12:
            break
        widths[i] -= 1
    for line in table[1:]:
        for i in shrinkable:
            if len(line[i]) > widths[i]:
                line[i] = line[i][: widths[i] - 1] + "\u2026"
    return widths
