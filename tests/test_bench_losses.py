"""`hardneg bench losses --quick` runs through the CLI and prints every ratio beside its goal (no timing asserts)."""

from __future__ import annotations

import re

import pytest
import torch

from pipeline.app import cli
from pipeline.app.bench import losses as bench

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_run_prints_every_ratio(capsys):
    assert cli.main(["bench", "losses", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "saved_tensors_hooks" in out or "max_memory_allocated" in out  # says how memory was measured
    assert "hcl <= 1.2x nt_xent time" in out and "sscl(32,8) <= 1.5x nt_xent time" in out
    names = list(bench.loss_cases())
    for b in (32, 64):
        for name in names:
            row = re.search(rf"^\s*{b} {re.escape(name)}\s+([\d.]+)\s+([\d.]+)x\s+([\d.]+)\s+([\d.]+)x", out, re.M)
            assert row, f"no row for B={b} {name}"
            if name == "nt_xent":
                assert row.group(2) == "1.00" and row.group(4) == "1.00"
        for name in ("nt_xent", "hcl", "sscl(32,8)"):
            row = re.search(rf"^\s*{b} {re.escape(name)}\s+[\d.]+\s+[\d.]+\s+([\d.]+)\s+~0\.125", out, re.M)
            assert row, f"no per-worker row for B={b} {name}"
            assert 0.0 < float(row.group(1)) < 0.5  # local rows x global columns: a fraction of replicated
    # a verdict beside the time ratio of each goal's loss, at each batch size
    verdicts = re.findall(
        r"^\s*(\d+) (\S+)\s+[\d.]+\s+[\d.]+x\s+[\d.]+\s+[\d.]+x\s+time <= ([\d.]+)x: (?:met|NOT met)$", out, re.M
    )
    assert sorted(verdicts) == [
        ("32", "hcl", "1.2"),
        ("32", "sscl(32,8)", "1.5"),
        ("64", "hcl", "1.2"),
        ("64", "sscl(32,8)", "1.5"),
    ]


def test_bad_arguments_are_refused(capsys):
    assert bench.main(["--sizes", "30", "--workers", "8"]) == 2
    assert "divide" in capsys.readouterr().out
    assert bench.main(["--sizes", "1"]) == 2


def test_simulated_gather_places_the_local_rows_at_their_rank():
    gather = bench._SimulatedGather(2, 4, 3, 5, torch.device("cpu"), torch.Generator().manual_seed(0))
    x = torch.zeros(3, 5)
    out = gather(x)
    assert out.shape == (12, 5) and torch.equal(out[6:9], x) and not torch.equal(out[:3], torch.zeros(3, 5))
