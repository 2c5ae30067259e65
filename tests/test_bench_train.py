"""`hardneg bench train --quick` runs every mode and prints the table and the overhead lines (no timing asserted)."""

from __future__ import annotations

import re
import shutil
import tempfile

import pytest

from pipeline.app.bench import train as bench

pytestmark = pytest.mark.slow


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


def test_quick_bench_prints_every_mode(capsys, monkeypatch, request):
    ray_tmp = tempfile.mkdtemp(prefix="hnbench-", dir="/tmp")  # short: Ray's socket paths live under it
    request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))
    monkeypatch.setenv("HARDNEG_RAY_TMP", ray_tmp)
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
    rates = [float(rate) for _, _, rate, _ in rows]
    assert all(rate > 0 for rate in rates)
    for rate, (_, _, _, vs_plain) in zip(rates, rows):  # the "vs plain" column is each rate over the plain one
        assert float(vs_plain) == pytest.approx(rate / rates[0], abs=2e-3)
    # each overhead line is 1 - Ray's rate / the native rate at the same worker count, judged against 5%
    for workers, native, ray_rate in ((1, rates[0], rates[1]), (2, rates[2], rates[3])):
        line = re.search(
            rf"Ray Train overhead at {workers} workers?: ([+-][\d.]+)% \((meets|misses) the goal <= 5%\)", out
        )
        assert line, out
        overhead = 100 * (1 - ray_rate / native)
        assert float(line.group(1)) == pytest.approx(overhead, abs=0.3)
        assert line.group(2) == ("meets" if float(line.group(1)) <= 5.0 else "misses")
