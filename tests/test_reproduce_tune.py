"""`hardneg reproduce` on Ray Tune, on the session's shared 2-CPU Ray (no Ray of their own to start):
cells run concurrently (Ray Train cells of 1 worker each), give the numbers the sequential runner gives, a failing
cell is retried and then one row "failed: REASON" while the others finish, the grid is one MLflow parent run with
a child per cell; a driver killed mid-grid and started again resumes without re-running finished cells."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from pipeline.app import cli
from pipeline.app.reproduce import load_grid, reproduce, run_cell

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def write_grid(tmp_path, shards: str, methods: dict[str, dict], seeds, overrides=(), method_overrides=None) -> str:
    """A grid of tiny digits cells; ``methods``: name -> what its config file holds besides the tiny base."""
    files = {}
    for name, extra in methods.items():
        body = {
            "augment": {"image_size": 8, "hflip_p": 0.0, "crop_scale_min": 0.6},
            "model": {"width": 4, "proj_hidden_dim": 32, "proj_dim": 16},
            "data": {"shuffle_buffer": 200},
            "train": {"global_batch_size": 128, "log_every_steps": 4, "knn_every_epochs": 0},
            "eval": {"knn_k": 20},
            "tracking": {
                "uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                "log_model": False,
                "plots": False,
                "system_metrics_every_s": 0,
            },
        }
        for section, values in extra.items():
            body[section] = body.get(section, {}) | values
        files[name] = tmp_path / f"{name}.yaml"
        files[name].write_text(yaml.safe_dump(body))
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        yaml.safe_dump(
            {
                "name": "tg",
                "out": str(tmp_path / "results"),
                "datasets": {"digits": shards},
                "methods": {name: str(path) for name, path in files.items()},
                "seeds": list(seeds),
                "overrides": ["train.epochs=1", "eval.probe_epochs=2", "eval.probe_augment=false", *overrides],
                "method_overrides": method_overrides or {},
            },
            sort_keys=False,
        )
    )
    return str(grid)


def timeline(records: dict[str, dict]) -> str:
    """Each trial's start and end, in seconds from the first start (what the test shows with -s)."""
    t0 = min(r["started_at"] for r in records.values())
    return "\n".join(
        f"  {name:28s} {r['started_at'] - t0:7.1f} s -> {r['ended_at'] - t0:7.1f} s"
        for name, r in sorted(records.items(), key=lambda kv: kv[1]["started_at"])
    )


def test_cells_run_concurrently_with_the_sequential_numbers_and_a_failing_cell_is_one_row(
    tmp_path, digits_shards, shared_ray, capsys
):
    from mlflow.tracking import MlflowClient

    ray_cell = {"cluster": {"launcher": "ray", "num_workers": 1, "max_failures": 1}}
    grid_path = write_grid(
        tmp_path,
        digits_shards,
        {
            "nt_xent": ray_cell,
            "hcl": ray_cell | {"loss": {"name": "hcl"}},
            # diverges at its second step (non-finite loss: a one-line HardnegError), in one local process
            "diverges": {"cluster": {"launcher": "local", "max_failures": 1}, "optim": {"lr": 1e30}},
        },
        seeds=[0, 1],
    )
    text = reproduce(grid_path, max_concurrent=2)
    out = capsys.readouterr().out
    cells = tmp_path / "results" / "tg" / "cells"
    records = {
        name: json.loads((cells / f"{name}.json").read_text())
        for name in ("nt_xent-digits-s0", "nt_xent-digits-s1", "hcl-digits-s0", "hcl-digits-s1")
    }
    with capsys.disabled():  # shown with -s
        print("\ntimeline (2 CPUs, --max-concurrent 2, 1 Ray Train worker per cell):\n" + timeline(records))

    # 2 trials at once: the two first cells (nt_xent's seeds) ran at the same time
    first, second = records["nt_xent-digits-s0"], records["nt_xent-digits-s1"]
    assert max(first["started_at"], second["started_at"]) < min(first["ended_at"], second["ended_at"])
    assert all(r["step"] == 10 and 0 < r["knn_top1"] <= 1 and 0 < r["linear_top1"] <= 1 for r in records.values())

    # the failing cells: retried once (cluster.max_failures=1), then one line each, and one row each in the table
    for seed in (0, 1):
        failed = json.loads((cells / f"diverges-digits-s{seed}.failed.json").read_text())
        assert failed["attempts"] == 2 and failed["failed"].startswith("non-finite loss or gradient norm at step 2")
        lines = [line for line in out.splitlines() if f"diverges-digits-s{seed}:" in line]
        assert len(lines) == 1 and "failed after 2 attempt(s): non-finite loss" in lines[0]
        assert f"| diverges | digits | seed {seed} | failed: non-finite loss" in text
    assert "| nt_xent | digits |" in text and "| 2 | – |" in text  # both seeds of the others

    # the same numbers as the sequential runner (one cell, in this process, from scratch)
    sequential = run_cell(load_grid(grid_path), "hcl", "digits", 1, str(tmp_path / "sequential"))
    assert sequential["knn_top1"] == records["hcl-digits-s1"]["knn_top1"]
    assert sequential["linear_top1"] == records["hcl-digits-s1"]["linear_top1"]

    # MLflow: one parent run holding the grid and its table, every trial a child
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tg")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`hardneg.grid` = 'tg'")
    assert parent.info.status == "FAILED"  # two of its cells failed for good
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted([*records, "diverges-digits-s0", "diverges-digits-s1"])
    assert {r.info.run_id for r in children} == {r["mlflow_run_id"] for r in records.values()} | {
        r.info.run_id for r in children if r.info.run_name.startswith("diverges")
    }
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"grid.yaml", "table.md", "table.csv"} <= artifacts
    with open(client.download_artifacts(parent.info.run_id, "table.md", str(tmp_path))) as f:
        assert f.read() == text
    knn = [records[f"hcl-digits-s{s}"]["knn_top1"] for s in (0, 1)]
    assert parent.data.metrics["grid/hcl/digits/knn_top1"] == pytest.approx(sum(knn) / 2)

    # `hardneg runs tg --grid`: the grid's children only (not the parent, not the sequential run)
    capsys.readouterr()
    assert cli.main(["runs", "tg", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--grid"]) == 0
    shown = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert sorted(shown) == sorted(r.info.run_name for r in children)


def _checkpoint_steps(runs_dir) -> dict[str, int]:
    from pipeline import checkpoint

    steps = {}
    for name in os.listdir(runs_dir) if os.path.isdir(runs_dir) else []:
        found = checkpoint.latest(os.path.join(runs_dir, name))
        if found is not None:
            steps[name] = checkpoint.load(found)["step"]
    return steps


def test_a_driver_killed_mid_grid_resumes_without_rerunning_finished_cells(tmp_path, digits_shards, shared_ray):
    import ray

    local = {"cluster": {"launcher": "local"}, "train": {"checkpoint_every_epochs": 1}}
    grid_path = write_grid(
        tmp_path,
        digits_shards,
        {"nt_xent": local, "hcl": local | {"loss": {"name": "hcl"}}},
        seeds=[0, 1],
        method_overrides={"hcl": ["train.epochs=4"]},  # still training when nt_xent's cells are done
    )
    root = tmp_path / "results" / "tg"
    # the driver is a process of its own (`hardneg reproduce --address`, the cluster's path), on this session's Ray
    command = [sys.executable, "-m", "pipeline.app.cli", "reproduce", grid_path, "--max-concurrent", "2"]
    command += ["--address", ray.get_runtime_context().gcs_address]
    first_log = open(tmp_path / "first.log", "w")
    driver = subprocess.Popen(command, stdout=first_log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 900  # a guard against hanging, not a measurement
    while driver.poll() is None and time.time() < deadline:
        finished = {p[: -len(".json")] for p in os.listdir(root / "cells")} if (root / "cells").is_dir() else set()
        started = set(_checkpoint_steps(root / "runs")) - finished
        if finished and any(name.startswith("hcl") for name in started):  # a cell done, hcl mid-training: kill now
            break
        time.sleep(0.5)
    assert driver.poll() is None, open(tmp_path / "first.log").read()
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    first_log.close()
    done = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in (root / "cells").glob("*-s?.json")}
    assert done and len(done) < 4
    at_kill = _checkpoint_steps(root / "runs")

    second = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout + second.stderr
    for name, (mtime, content) in done.items():  # finished cells: skipped, not run again
        cell = name[: -len(".json")]
        assert (root / "cells" / name).stat().st_mtime_ns == mtime and (root / "cells" / name).read_text() == content
        assert [line for line in second.stdout.splitlines() if f"{cell}:" in line] == [
            f"[reproduce] {cell}: done, skipped"
        ]
    records = {p.stem: json.loads(p.read_text()) for p in (root / "cells").glob("*-s?.json")}
    assert len(records) == 4 and all(r["step"] == (40 if r["method"] == "hcl" else 10) for r in records.values())
    resumed = {name for name, r in records.items() if r.get("resumed_from_step")}
    assert resumed and all(records[name]["resumed_from_step"] >= at_kill[name] > 0 for name in resumed)
    assert all(f"{name}: knn_top1" in second.stdout for name in set(records) - {n[:-5] for n in done})
    print("after the kill:", sorted(done), "checkpoints", at_kill, "resumed", sorted(resumed))
