"""`hardneg bench train --quick` runs every mode and prints the table and the overhead lines (no timing asserted)."""

from __future__ import annotations

import re

import pytest

from pipeline.app.bench import train as bench


def test_step_loop_in_one_process():
    args = {
        "steps": 1,
        "repeats": 2,
        "warmup": 1,
        "batch": 8,
        "width": 4,
        "image_size": 16,
        "threads": 1,
        "device": "cpu",
    }
    result = bench.step_loop(args, bench.torch.device("cpu"))
    assert result["world_size"] == 1 and result["images_per_s"] > 0


@pytest.mark.ray
def test_quick_bench_prints_every_mode(capsys, shared_ray):
    assert bench.main(["--quick", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    print(out)
    rows = re.findall(
        r"^(plain process|Ray Train|torch DDP, 2 processes)\s+(\d)\s+1\s+([\d.]+)\s+([\d.]+)$", out, re.M
    )  # every worker really ran the 1 thread asked for
    assert [(name, workers) for name, workers, _, _ in rows] == [
        ("plain process", "1"),
        ("Ray Train", "1"),
        ("torch DDP, 2 processes", "2"),
        ("Ray Train", "2"),
    ]
    assert all(float(rate) > 0 for _, _, rate, _ in rows)  # each mode really trained
    assert rows[0][3] == "1.000"  # the plain process is the reference of the "vs plain" column
    for workers in (1, 2):  # one overhead line per worker count, judged against the goal
        assert re.search(
            rf"^Ray Train overhead at {workers} workers?: [+-][\d.]+% \((meets|misses) the goal <= 5%\)$", out, re.M
        ), out
