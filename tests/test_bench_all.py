"""`hardneg bench all` runs on CPU at small sizes and writes a JSON report naming the machine."""

from __future__ import annotations

import json

import pytest

from pipeline.app.bench import BENCHES
from pipeline.app.bench.all import ARGS
from pipeline.app.cli import main


def test_every_section_is_a_registered_bench():
    assert set(ARGS) <= set(BENCHES) and "step" in BENCHES


@pytest.mark.slow  # tens of seconds of CPU: not in make test-fast
def test_bench_all_quick_step_section(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[1])  # configs/demo.yaml
    out = tmp_path / "report.json"
    assert main(["bench", "all", "--quick", "--only", "step", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    step = report["sections"]["step"]
    assert report["machine"]["device"] == "cpu" and report["machine"]["cpus"] >= 1
    shares = step["shares"]
    assert abs(sum(v for k, v in shares.items() if not k.startswith("gather")) - 1.0) < 1e-6
    assert step["views_per_s"] > 0 and step["gather_s_2proc_gloo"] > 0
    printed = capsys.readouterr().out
    assert "data_wait" in printed and "report written to" in printed
