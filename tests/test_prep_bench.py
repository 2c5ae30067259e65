"""`hardneg bench prep --quick` runs end to end and prints every figure (a smoke test, never timed)."""
from __future__ import annotations

import re

from pipeline.cli import main


def test_bench_prep_quick(tmp_path, capsys):
    assert main(["bench", "prep", "--quick", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"conversion  WebDataset shards +\d+ img/s  \(\d+ img/s per worker\)", out), out
    assert re.search(r"torchvision in-memory +\d+ img/s   1\.00x", out), out
    assert re.search(r"WebDataset per sample +\d+ img/s +\d+\.\d\dx\n", out), out
    assert re.search(r"WebDataset batched +\d+ img/s +\d+\.\d\dx  \(goal >= 1\.2x", out), out
    assert re.search(r"FFCV +(\d+ img/s +\d+\.\d\dx  \(goal >= 2\.0x|unavailable)", out) or "unavailable" in out, out
    assert list(tmp_path.iterdir()) == [], "the work directory is cleaned up"
