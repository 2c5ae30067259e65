"""A new user's first hour (issue 25), through the real console script: every format trains, evaluates and
probes; what can be checked before a run is checked before it; impossible settings are one line."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest
from conftest import tiny_overrides

HARDNEG = os.path.join(os.path.dirname(sys.executable), "hardneg")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hardneg(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([HARDNEG, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hardneg: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def mlflow_runs(db) -> int:
    """How many MLflow runs the SQLite store at ``db`` holds (0 when it does not exist)."""
    if not os.path.exists(db):
        return 0
    with sqlite3.connect(db) as con:
        return con.execute("select count(*) from runs").fetchone()[0]


@pytest.fixture(scope="module")
def formats(tmp_path_factory) -> dict:
    """builtin:digits prepared as WebDataset only, and FFCV only and both (when FFCV is built here)."""
    root = tmp_path_factory.mktemp("formats")
    out = {}
    for fmt in ("wds", "ffcv", "both"):
        if fmt != "wds":
            try:
                import ffcv.loader  # noqa: F401
            except Exception:  # noqa: BLE001 -- ImportError, or a broken native build: FFCV formats are skipped
                continue
        proc = hardneg("prep", "builtin:digits", str(root / fmt), "--format", fmt, "--shard-size", "256", "--quiet")
        assert proc.returncode == 0, proc.stderr
        out[fmt] = str(root / fmt)
    return out


@pytest.mark.slow  # three trainings + probes through the CLI
@pytest.mark.parametrize(("prepared", "read"), [("ffcv", "ffcv"), ("both", "ffcv"), ("wds", "wds")])
def test_every_format_trains_monitors_evaluates_and_probes(tmp_path, formats, prepared, read):
    """`hardneg prep --format ffcv|both|wds`, then train (kNN monitor on), eval --protocol all --track."""
    if prepared not in formats:
        pytest.skip("FFCV is not built in this environment (`python -c 'import ffcv'` fails; make setup builds it)")
    data = formats[prepared]
    overrides = tiny_overrides(tmp_path, data, f"data.format={read}", "cluster.launcher=local", "tracking.run_name=ff")
    proc = hardneg("train", *overrides)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "knn_top1" in proc.stdout  # the kNN monitor ran on the holdout split, read from holdout.beton
    assert "kNN top-1" in proc.stdout and "on split holdout" in proc.stdout  # the summary names the split
    run_dir = tmp_path / "runs" / "ff"
    proc = hardneg(
        "eval", "--checkpoint", str(run_dir), "--data", data, "--protocol", "all", "eval.probe_epochs=1", "--track"
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert 0.0 <= result["knn_top1"] <= 1.0 and 0.0 <= result["linear_top1"] <= 1.0
    with sqlite3.connect(tmp_path / "mlflow.db") as con:
        assert con.execute("select status from runs").fetchall() == [("FINISHED",)]


@pytest.mark.slow  # two CLI processes that load the training stack
def test_a_format_missing_from_the_data_is_one_line_before_any_run(tmp_path, formats):
    db = tmp_path / "mlflow.db"
    wds_only = formats["wds"]
    proc = hardneg("train", *tiny_overrides(tmp_path, wds_only, "data.format=ffcv", "cluster.launcher=local"))
    assert_one_line_error(proc, "data.format=ffcv", "no FFCV file", "set data.format=wds", "--format both")
    if "ffcv" in formats:
        proc = hardneg("train", *tiny_overrides(tmp_path, formats["ffcv"], "data.format=wds", "cluster.launcher=local"))
        assert_one_line_error(proc, "data.format=wds", "no WebDataset shards", "set data.format=ffcv")
    assert mlflow_runs(db) == 0
    assert not (tmp_path / "runs").exists() or os.listdir(tmp_path / "runs") == []


def test_a_tracking_uri_under_a_regular_file_is_one_line_and_leaves_nothing(tmp_path, formats):
    (tmp_path / "afile").write_text("x")
    overrides = tiny_overrides(tmp_path, formats["wds"], "cluster.launcher=local")
    proc = hardneg("train", *overrides, f"tracking.uri=sqlite:///{tmp_path / 'afile' / 'm.db'}")
    assert_one_line_error(proc, "tracking.uri=", "afile is a file, not a directory")
    assert sorted(os.listdir(tmp_path)) == ["afile"]  # no run folder, no storage folder, no store


@pytest.mark.parametrize(
    ("settings", "needles"),
    [
        (
            ["loss.name=sscl", "train.global_batch_size=3"],
            ["loss.n_hard=32", "4 negatives per anchor", "train.global_batch_size=3", "train.global_batch_size>=17"],
        ),
        (["loss.name=sscl", "loss.n_hard=1000"], ["loss.n_hard=1000", "254 negatives", "loss.n_hard<=254"]),
    ],
)
def test_a_batch_too_small_for_the_method_is_refused(tmp_path, formats, settings, needles):
    proc = hardneg("train", *tiny_overrides(tmp_path, formats["wds"], "cluster.launcher=local", *settings))
    assert_one_line_error(proc, *needles)
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists(tmp_path / "mlflow.db")


def test_n_hard_as_a_diagnostic_count_is_not_refused():
    """Outside SSCL, n_hard only counts the hardest negatives a diagnostic reports (clamped to what exists)."""
    from pipeline import config

    cfg = config.load(None, ["loss.name=hcl", "loss.n_hard=1000", "train.global_batch_size=128"])
    assert config.from_dict(config.to_dict(cfg)).loss.n_hard == 1000  # also after a round trip (checkpoints)


@pytest.mark.slow  # a forced CPU training through the CLI
def test_use_gpu_without_a_gpu_is_refused_unless_forced(tmp_path, formats):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    overrides = tiny_overrides(tmp_path, formats["wds"], "cluster.launcher=local", "cluster.use_gpu=true")
    assert_one_line_error(hardneg("train", *overrides), "cluster.use_gpu=true", "no CUDA GPU", "HARDNEG_ALLOW_NO_GPU=1")
    assert not os.path.exists(tmp_path / "runs") and mlflow_runs(tmp_path / "mlflow.db") == 0
    forced = subprocess.run(
        [HARDNEG, "train", *overrides, "train.knn_every_epochs=0", "tracking.enabled=false"],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ | {"HARDNEG_ALLOW_NO_GPU": "1"},
    )
    assert forced.returncode == 0, forced.stderr
    assert "training on CPU" in forced.stderr


def test_shard_size_zero_is_refused(tmp_path):
    proc = hardneg("prep", "builtin:digits", str(tmp_path / "out"), "--shard-size", "0", "--quiet")
    assert_one_line_error(proc, "shard_size=0 (--shard-size)", "integer >= 1")
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow  # a training, then eval through the CLI
def test_eval_shows_each_stage_on_stderr_and_json_on_stdout(tmp_path, formats):
    data = formats["wds"]
    overrides = tiny_overrides(
        tmp_path, data, "cluster.launcher=local", "tracking.enabled=false", "tracking.run_name=e"
    )
    assert hardneg("train", *overrides, "train.knn_every_epochs=0").returncode == 0
    proc = hardneg(
        "eval", "--checkpoint", str(tmp_path / "runs" / "e"), "--data", data, "--protocol", "all", "eval.probe_epochs=1"
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # stdout stays pure JSON
    stages = [line for line in proc.stderr.splitlines() if not line.startswith("hardneg: warning:")]
    assert stages == [
        "kNN: features of split train: 1347 img",
        "kNN: features of split test: 300 img",
        "probe: features of split test: 300 img",
        "probe: 1 epochs over split train: 1347 img",
    ]
    assert "\r" not in proc.stderr and "\x1b[" not in proc.stderr  # not a terminal: no live bar
    assert ("warning" in result) == (result["linear_top1"] < result["chance_top1"])


def test_a_probe_below_chance_says_so_with_its_settings(formats):
    """A constant encoder: the probe can only answer one class; below chance unless it is the commonest."""
    import torch
    from torch import nn

    from pipeline.config import AugmentConfig, EvalConfig
    from pipeline.probe import below_chance, linear_probe

    class Zero(nn.Module):
        def forward(self, x):
            return torch.zeros(len(x), 4)

    eval_cfg = EvalConfig(probe_epochs=1, probe_lr=1e-12, probe_augment=False)
    aug = AugmentConfig(image_size=8)
    results = [linear_probe(Zero(), formats["wds"], "train", "test", eval_cfg, aug, seed=s) for s in range(4)]
    assert all(r["linear_top1"] <= r["chance_top1"] for r in results)
    below = [r for r in results if r["linear_top1"] < r["chance_top1"]]
    assert below, "a random constant answer is below chance for some seed"
    for r in below:
        assert r["warning"] == below_chance(r["linear_top1"], r["chance_top1"], eval_cfg)
        for needle in ("below chance", "eval.probe_epochs=1", "eval.probe_optimizer=adam", "eval.probe_lr=1e-12"):
            assert needle in r["warning"]


def test_a_prep_rerun_writes_nothing_and_says_so(tmp_path):
    from PIL import Image

    src = tmp_path / "img"
    for c in "ab":
        (src / "train" / c).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(src / "train" / c / f"{i}.png")
    (src / "train" / "a" / "bad.png").write_bytes(b"not an image")  # skipped: PIL names an object address
    out = tmp_path / "out"
    first = hardneg("prep", f"imagefolder:{src}", str(out), "--quiet")
    assert first.returncode == 0 and first.stdout.startswith(f"wrote {out} "), first.stderr
    manifest = (out / "manifest.json").read_bytes()
    assert b" at 0x" not in manifest and b"created" not in manifest and b"workers" not in manifest
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = hardneg("prep", f"imagefolder:{src}", str(out), "--quiet", "--workers", "2")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"nothing to do: every file is in place in {out} ")
    assert (out / "manifest.json").read_bytes() == manifest
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps  # not one file rewritten
    assert json.loads((out / "prep_run.json").read_text())["workers"] == 1  # the run that wrote it


def test_messages_name_commands_that_exist(tmp_path):
    proc = hardneg("prep", "verify", str(tmp_path / "none"))
    assert_one_line_error(proc, "no manifest", f"hardneg prep SOURCE {tmp_path / 'none'}")
    assert "prepare first" not in proc.stderr


def test_moco_v2_is_labelled_moco_v2(tmp_path):
    from pipeline import config, run_info
    from pipeline.app.train_command import choose_run_name

    manifest = {"dataset": "builtin:digits", "splits": {"train": {"num_samples": 10}}}
    moco = config.load(os.path.join(ROOT, "configs/digits/moco_v2.yaml"), [f"cluster.storage_path={tmp_path}"])
    mochi = config.load(os.path.join(ROOT, "configs/digits/mochi.yaml"), [f"cluster.storage_path={tmp_path}"])
    assert run_info.run_tags(moco, manifest, 1)["method"] == "moco_v2"
    assert run_info.run_note(moco, manifest, 1).startswith("moco_v2 (")
    assert choose_run_name(moco, None).startswith("moco_v2-")
    assert run_info.run_tags(mochi, manifest, 1)["method"] == "mochi"


def test_runs_fits_120_columns_and_shows_training_time():
    from pipeline.app.runs_view import COLUMNS, NARROW, render

    row = {
        "run": "sscl-20261203-145200-a-very-long-name-given-by-tracking-run-name",
        "run id": "e007062f97834212ba09ebe13940f1ad",
        "method": "moco_v2",
        "dataset": "imagefolder:/data/a/rather/long/path/to/the/images",
        "started": 1796354102.0,
        "train time": 125.0,
        "settings": "mochi_momentum=0.99 mochi_queue_size=256 mochi_n_hard=64 mochi_s=0 mochi_s_prime=0",
        "best kNN": 0.9,
        "last kNN": 0.89,
        "probe top-1": None,
        "status": "FINISHED",
    }
    narrow = render([row], "text", NARROW).splitlines()
    assert max(len(line) for line in narrow) <= 120, narrow
    assert "2m05s" in narrow[1] and "\u2026" in narrow[1]
    wide = render([row], "text", COLUMNS)
    assert row["run id"] in wide and row["settings"] in wide and row["dataset"] in wide


@pytest.mark.parametrize(
    "launcher", [pytest.param("local", marks=pytest.mark.slow), pytest.param("ray", marks=pytest.mark.ray)]
)
def test_max_steps_checkpoints_by_step_keeps_the_newest_and_a_quiet_console(tmp_path, formats, launcher):
    """train.max_steps ends the run mid-epoch like an epoch end; checkpoint folders are named by step under both
    launchers and only the newest cluster.checkpoints_to_keep stay; without --verbose a Ray run's console holds
    the training lines only: no Ray C++ log lines, no "(RayTrainWorker pid=...)" prefixes, no ANSI codes."""
    overrides = tiny_overrides(
        tmp_path,
        formats["wds"],
        f"cluster.launcher={launcher}",
        "cluster.num_workers=1",
        "train.epochs=4",
        "train.max_steps=25",  # 10 steps per epoch: checkpoints at 10, 20 and 25
        "train.knn_every_epochs=0",
        "cluster.checkpoints_to_keep=2",
        "tracking.run_name=short",
    )
    proc = hardneg("train", *overrides)
    assert proc.returncode == 0, proc.stderr
    console = proc.stdout + proc.stderr
    assert "epoch 3/3 step 25/25" in proc.stdout
    assert "run short: 25 steps" in proc.stdout
    for noise in ("RayTrainWorker", "TrainController", "pid=", ".cc:", "\x1b[", "Traceback"):
        assert noise not in console, console
    run_dir = tmp_path / "runs" / "short"
    assert sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir()) == [
        "checkpoint_00000020",
        "checkpoint_00000025",
    ]


def test_version():
    from importlib.metadata import version

    proc = hardneg("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"hardneg {version('hardneg')}"


def test_reproduce_refuses_a_file_that_is_not_a_grid_before_the_heavy_imports(tmp_path):
    (tmp_path / "manifest.json").write_text('{"version": 1, "splits": {}}')
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    cases = [
        (
            os.path.join(ROOT, "configs/demo.yaml"),
            ("is not a grid", "lacks name, datasets, methods", "hardneg train --config"),
        ),
        (str(tmp_path / "manifest.json"), ("is not a grid", "lacks name, datasets, methods")),
        (str(tmp_path / "list.yaml"), ("is not a grid", "holds list")),
        (str(tmp_path / "none.yaml"), ("grid file not found",)),
    ]
    for path, needles in cases:
        assert_one_line_error(hardneg("reproduce", path), *needles)
    # the check imports YAML only: not torch, MLflow or Ray
    probe = (
        "import sys; from pipeline.app.grid_file import check_grid_file\n"
        "try: check_grid_file('configs/demo.yaml')\nexcept Exception: pass\n"
        "print(sorted(m for m in ('torch', 'mlflow', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stderr


def test_prep_test_fraction_gives_a_source_without_one_a_test_split(tmp_path):
    from PIL import Image

    src = tmp_path / "img"
    for c in "ab":
        (src / "train" / c).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (8, 8), (i * 30, 100 if c == "a" else 0, 0)).save(src / "train" / c / f"{i}.png")
    out = tmp_path / "out"
    proc = hardneg("prep", f"imagefolder:{src}", str(out), "--quiet", "--test-fraction", "0.25")
    assert proc.returncode == 0, proc.stderr
    assert "train: 12 in 1 shards, test: 4 in 1 shards" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["prep"]["test_fraction"], manifest["prep"]["test_split"]) == (0.25, "test")
    from pipeline.data import labelled_images

    test = list(labelled_images(str(out), "test"))
    train = list(labelled_images(str(out), "train"))
    assert sorted(label for _, label in test) == [0, 0, 1, 1]  # per class
    pixels = {image.tobytes() for image, _ in train}
    assert not any(image.tobytes() in pixels for image, _ in test)  # no image in both
    assert_one_line_error(
        hardneg("prep", "builtin:digits", str(tmp_path / "d"), "--test-fraction", "0.2", "--quiet"),
        "already has a 'test' split",
        "--test-fraction 0",
    )


def test_a_quiet_console_keeps_the_training_workers_lines_only():
    pytest.importorskip("ray")
    from cluster.connect import training_lines

    e_line = (
        "[2026-12-03 14:52:00,554 E 24388 24453] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
        "and ID: '7cd4' has constructor arguments in the object store and max_restarts > 0."
    )
    assert (
        training_lines({"actor_name": "TrainController", "lines": [e_line, "Traceback (most recent call last):"]}) == []
    )
    worker = {"actor_name": "RayTrainWorker", "pid": 7, "lines": ["epoch 1/3 step 10/30 loss 5.4", e_line]}
    assert training_lines(worker) == ["epoch 1/3 step 10/30 loss 5.4"]


def test_a_tracking_store_path_that_cannot_be_a_store_is_one_line(tmp_path):
    from pipeline.config import TrackingConfig
    from pipeline.errors import HardnegError
    from pipeline.tracking_store import check_store_path

    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    for uri, needle in [
        (f"sqlite:///{tmp_path}/afile/deeper/m.db", "afile is a file, not a directory"),
        (f"sqlite:///{tmp_path}/adir", "adir is a directory; name a database file in it"),
        (f"file://{tmp_path}/afile", "afile is a file; a file store needs a directory"),
    ]:
        with pytest.raises(HardnegError, match=needle):
            check_store_path(TrackingConfig(uri=uri))
    check_store_path(TrackingConfig(uri=f"sqlite:///{tmp_path}/new/dirs/m.db"))  # MLflow creates those
    check_store_path(TrackingConfig(uri="http://127.0.0.1:1"))  # a server: checked by check_server_access
    assert sorted(os.listdir(tmp_path)) == ["adir", "afile"]
