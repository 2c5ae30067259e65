"""`hardneg bench prep --quick` runs end to end and prints every figure (a smoke test, never timed)."""

from __future__ import annotations

import re

import pytest

from pipeline.app.cli import main


@pytest.mark.slow  # tens of seconds of CPU: not in make test-fast
def test_bench_prep_quick(tmp_path, capsys):
    assert main(["bench", "prep", "--quick", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"conversion  WebDataset shards +\d+ img/s  \(\d+ img/s per worker\)", out), out
    assert re.search(r"torchvision in-memory +\d+ img/s   1\.00x", out), out
    assert re.search(r"WebDataset per sample +\d+ img/s +\d+\.\d\dx\n", out), out
    assert re.search(r"WebDataset batched +\d+ img/s +\d+\.\d\dx  \(goal >= 1\.2x", out), out
    assert re.search(r"FFCV +(\d+ img/s +\d+\.\d\dx  \(goal >= 2\.0x|unavailable)", out) or "unavailable" in out, out
    assert list(tmp_path.iterdir()) == [], "the work directory is cleaned up"


def test_scale_fits():
    from pipeline.app.bench.prep_scale import fit_exponent, fit_linear

    sizes = [10_000, 40_000, 160_000]
    assert abs(fit_exponent(sizes, [2e-3 * n for n in sizes]) - 1.0) < 1e-9
    a, b = fit_linear(sizes, [5.0 + 1e-3 * n for n in sizes])
    assert abs(a - 5.0) < 1e-6 and abs(b - 1e-3) < 1e-12


@pytest.mark.slow
def test_bench_prep_scale_quick(tmp_path, capsys):
    assert main(["bench", "prep", "--scale", "--quick", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for n in (300, 600):  # one row per size: prep and read time per image, peak RSS of main and worker
        assert re.search(rf"^ +{n} \| +\d+\.\d+ \| +\d+ / +\d+ \| +\d+\.\d+ \| +\d+ / +\d+$", out, re.M), out
    # Two small sizes on a busy machine can give a negative per-image slope (start-up dominates): sign either way.
    assert re.search(r"fit: prep time = -?\d+\.\d s [+-] \d+\.\d+ ms x n", out), out
    assert list(tmp_path.iterdir()) == [], "the work directory is cleaned up"
