"""Training never waits on the tracking server: `mlflow server` on 127.0.0.1 killed mid-run.

Steps keep advancing while it is down (checkpoints by steps land in the run directory), and once it
is back every metric step is in the store. A server that never returns: the run finishes, warns in one
line, keeps the records in the run directory, and `hardneg runs sync RUN_DIR` uploads them later.

The outage lasts HARDNEG_TEST_OUTAGE_S seconds (10 by default, to keep CI short; `make soak` holds it 60 s).
Run with -s to see the figures.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import free_port
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.server
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTAGE_S = float(os.environ.get("HARDNEG_TEST_OUTAGE_S", "10"))
SPE = 1347 // 128  # steps per epoch of the digits train split (1347 after the val holdout) at batch 128


class Server:
    """`mlflow server` on 127.0.0.1:port over one SQLite file; stop() kills it (and its workers) at once."""

    def __init__(self, root, port: int):
        self.root, self.port, self.proc = root, port, None
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> "Server":
        mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")
        self.proc = subprocess.Popen(
            [
                mlflow_bin,
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'server.db'}",
                "--artifacts-destination",
                str(self.root / "art"),
            ],
            stdout=open(self.root / "server.log", "a"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("mlflow server did not start:\n" + (self.root / "server.log").read_text()[-3000:])
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the server and its workers
            self.proc.wait(timeout=30)


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path, free_port())
    yield s
    s.stop()


def _train(tmp_path, shards: str, url: str, *extra: str) -> subprocess.Popen:
    args = [
        f"data.path={shards}",
        "data.shuffle_buffer=200",
        "augment.image_size=8",
        "augment.hflip_p=0",
        "augment.crop_scale_min=0.6",
        "model.width=4",
        "model.proj_hidden_dim=32",
        "model.proj_dim=16",
        "train.global_batch_size=128",
        "train.log_every_steps=1",
        "train.knn_every_epochs=0",
        "train.checkpoint_every_steps=2",
        "eval.knn_k=20",
        "cluster.launcher=local",
        f"cluster.storage_path={tmp_path / 'runs'}",
        f"tracking.uri={url}",
        "tracking.plots=false",
        "tracking.log_model=false",
        "tracking.system_metrics_every_s=0",
        "tracking.run_name=outage",
        *extra,
    ]
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.app.cli", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
        cwd=ROOT,
    )


def _saved_step(run_dir) -> int:
    """The highest checkpoint step in the run directory (0 when none): training's progress, server or not."""
    best = 0
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
        try:
            with open(os.path.join(run_dir, name, "meta.json")) as f:
                best = max(best, json.load(f)["step"])
        except (OSError, ValueError, KeyError):
            continue
    return best


def _wait_for_logged_steps(url: str, n: int, proc: subprocess.Popen) -> str:
    client = MlflowClient(url)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        if runs and len(client.get_metric_history(runs[0].info.run_id, "train/loss")) >= n:
            return runs[0].info.run_id
        time.sleep(0.5)
    raise AssertionError(f"no {n} logged steps: {proc.poll()} {proc.stderr.read()[-3000:] if proc.poll() else ''}")


def _check_complete(url: str, run_id: str, total: int) -> int:
    client = MlflowClient(url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert steps == sorted(set(steps)), f"{key}: steps repeat: {steps}"
    loss = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    missing = sorted(set(range(1, total + 1)) - set(loss))
    assert missing == [] and len(loss) == total
    return len(missing)


def test_steps_advance_while_the_server_is_down_and_no_metric_is_lost(tmp_path, digits_shards, server):
    epochs = 3  # the run must still be training when the server goes down; it may end during the outage
    total = epochs * SPE
    server.start()
    proc = _train(tmp_path, digits_shards, server.url, f"train.epochs={epochs}", "tracking.flush_timeout_s=300")
    try:
        run_id = _wait_for_logged_steps(server.url, 3, proc)
        run_dir = tmp_path / "runs" / "outage"
        server.stop()
        down_at, before = time.monotonic(), _saved_step(run_dir)
        time.sleep(OUTAGE_S)
        during = _saved_step(run_dir)
        print(
            f"\n[outage] server down {time.monotonic() - down_at:.0f} s: checkpointed step {before} -> {during} "
            f"of {total} meanwhile",
            flush=True,
        )
        assert during > before, "training stood still while the tracking server was down"
        server.start()
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    missing = _check_complete(server.url, run_id, total)
    print(f"[outage] after the restart: {total} loss steps in the store, {missing} missing", flush=True)


def test_a_server_that_never_returns_spools_and_runs_sync_uploads_later(tmp_path, digits_shards, server):
    epochs = 2
    total = epochs * SPE
    server.start()
    proc = _train(tmp_path, digits_shards, server.url, f"train.epochs={epochs}", "tracking.flush_timeout_s=2")
    try:
        run_id = _wait_for_logged_steps(server.url, 2, proc)
        server.stop()
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    warnings = [line for line in err.splitlines() if "hardneg runs sync" in line]
    run_dir = str(tmp_path / "runs" / "outage")
    assert len(warnings) == 1 and warnings[0].startswith("hardneg: warning:") and run_dir in warnings[0], err[-3000:]
    assert os.path.exists(os.path.join(run_dir, "tracking-spool", "records.jsonl"))

    server.start()
    env = {**os.environ, "PYTHONPATH": ROOT}
    sync = subprocess.run(
        [sys.executable, "-m", "pipeline.app.cli", "runs", "sync", run_dir],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert sync.returncode == 0, sync.stderr[-3000:]
    _check_complete(server.url, run_id, total)
    assert not os.path.exists(os.path.join(run_dir, "tracking-spool"))
    again = subprocess.run(
        [sys.executable, "-m", "pipeline.app.cli", "runs", "sync", run_dir],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert again.returncode == 2 and "nothing to upload" in again.stderr and "Traceback" not in again.stderr
    print(f"\n[never back] {warnings[0]}\n[sync] {sync.stdout.strip()}", flush=True)
