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


@pytest.mark.slow  # two measuring processes
def test_bench_memory_measures_both_steps_in_fresh_processes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[1])  # configs/demo.yaml
    out = tmp_path / "memory.json"
    small = ["model.width=4", "model.proj_hidden_dim=32", "augment.image_size=8"]
    args = ["--batches", "512", "--chunk", "128", "--tile", "256", "--steps", "2", "--threads", "1"]
    assert main(["bench", "memory", *args, "--json", str(out), *small]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["kind"] for r in rows] == ["plain", "chunk 128, tile 256"]
    # the figures themselves are the bench's to print (docs/benchmarks.md), not this test's to bound: at this size
    # a step's growth of the peak resident set can be 0 pages on a busy machine
    assert all(isinstance(r["peak_bytes"], int) and r["peak_bytes"] >= 0 and r["step_s"] > 0 for r in rows)
    printed = capsys.readouterr().out
    assert "largest G within 8 GiB, plain: 512" in printed and "step time at G=512: chunked / plain" in printed
