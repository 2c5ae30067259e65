"""`make soak`: one longer demo-sized training with every fault of docs/faults.md injected, then one table.

Faults, in one run (Ray Train, 2 CPU workers, configs/demo.yaml, an `mlflow server` on 127.0.0.1):
a corrupt shard within the skip budget, a SIGKILLed training worker, the tracking server down for
SOAK_OUTAGE_S seconds (60) and restarted, a SIGTERM (`hardneg stop`) and a `--resume`. A clean run of
the same config gives the reference wall time. Knobs: SOAK_EPOCHS (16), SOAK_OUTAGE_S (60).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PY = sys.executable
EPOCHS = int(os.environ.get("SOAK_EPOCHS", "16"))
OUTAGE_S = float(os.environ.get("SOAK_OUTAGE_S", "60"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` on 127.0.0.1 over one SQLite file; stop() kills its whole session."""

    def __init__(self, root: str):
        self.root, self.port, self.proc = root, free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                os.path.join(os.path.dirname(PY), "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.root}/server.db",
                "--artifacts-destination",
                f"{self.root}/art",
            ],
            stdout=open(f"{self.root}/server.log", "a"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def corrupt(shards: str, bad: int = 3) -> None:
    """``bad`` undecodable images in train-000001.tar (whole tar members, so the shard still lists)."""
    import io

    path = os.path.join(shards, "train-000001.tar")
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    broken = 0
    with tarfile.open(path + ".tmp", "w") as out:
        for member, payload in members:
            if broken < bad and not member.name.endswith(".cls"):
                payload, broken = b"not an image" + payload[:5], broken + 1
                member.size = len(payload)
            out.addfile(member, io.BytesIO(payload))
    os.replace(path + ".tmp", path)


def descendants(root: int) -> list[int]:
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [root]
    while frontier:
        kids = [pid for pid, ppid in parent.items() if ppid in frontier]
        found += kids
        frontier = kids
    return found


def train_workers(root: int) -> list[int]:
    out = []
    for pid in descendants(root):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"RayTrainWorker" in f.read():
                    out.append(pid)
        except OSError:
            continue
    return sorted(out)


def saved_step(run_dir: str) -> int:
    best = 0
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
        try:
            with open(os.path.join(run_dir, name, "meta.json")) as f:
                best = max(best, json.load(f)["step"])
        except (OSError, ValueError, KeyError):
            continue
    return best


def logged(url: str, run_name: str, key: str = "train/loss") -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    runs = [
        r
        for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
        if r.info.run_name == run_name
    ]
    return [(m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, key)] if runs else []


def wait_until(predicate, proc, what: str, timeout: float = 1200) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"training ended (exit {proc.returncode}) before {what}")
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 -- the server may be restarting
            pass
        time.sleep(1)
    raise RuntimeError(f"timed out waiting for {what}")


def main() -> int:
    from data_prep.prep import prepare

    work = tempfile.mkdtemp(prefix="hardneg-soak-", dir="/tmp")
    os.environ["HARDNEG_RAY_TMP"] = work
    clean_shards, bad_shards = f"{work}/clean", f"{work}/bad"
    prepare("builtin:digits", clean_shards, shard_size=256)
    shutil.copytree(clean_shards, bad_shards)
    corrupt(bad_shards)
    server = Server(work)
    server.start()
    env = {**os.environ, "PYTHONPATH": ROOT}
    spe = 1347 // 128  # the digits train split after the val holdout
    total = EPOCHS * spe

    def args(shards: str, name: str) -> list[str]:
        return [
            "--config",
            "configs/demo.yaml",
            f"data.path={shards}",
            f"train.epochs={EPOCHS}",
            "train.log_every_steps=1",
            "train.knn_every_epochs=8",
            "train.checkpoint_every_steps=10",
            "cluster.max_failures=3",
            "data.max_skip_fraction=0.01",
            f"cluster.storage_path={work}/runs",
            f"tracking.uri={server.url}",
            "tracking.log_model=false",
            "tracking.system_metrics_every_s=0",
            "tracking.flush_timeout_s=300",
            f"tracking.run_name={name}",
        ]

    def train(shards: str, name: str, *extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [PY, "-m", "pipeline.app.cli", "train", *args(shards, name), *extra],
            cwd=ROOT,
            env=env,
            stdout=open(f"{work}/{name}.log", "a"),
            stderr=subprocess.STDOUT,
        )

    start = time.monotonic()
    clean = train(clean_shards, "clean")
    clean.wait()
    clean_s = time.monotonic() - start
    print(f"clean run: exit {clean.returncode}, {clean_s:.0f} s", flush=True)

    faults: dict[str, bool] = {}
    run_dir = f"{work}/runs/soak"
    start = time.monotonic()
    proc = train(bad_shards, "soak")
    # 1. a killed training worker, once a checkpoint is registered and steps were logged past it
    wait_until(
        lambda: (
            saved_step(run_dir) >= 10 and len(logged(server.url, "soak")) >= 15 and len(train_workers(proc.pid)) == 2
        ),
        proc,
        "the first checkpoint",
    )
    victim = train_workers(proc.pid)[-1]
    os.kill(victim, signal.SIGKILL)
    print(f"killed training worker {victim}", flush=True)
    wait_until(lambda: len(logged(server.url, "soak")) >= 45, proc, "steps after the restart")
    faults["worker SIGKILLed"] = True
    # 2. the tracking server down for OUTAGE_S seconds
    server.stop()
    before = saved_step(run_dir)
    time.sleep(OUTAGE_S)
    during = saved_step(run_dir)
    # restarted in the background: an `mlflow server` takes a minute to answer on a busy machine, and the
    # training (which never waits for it) would finish before the stop below
    restart = threading.Thread(target=server.start, daemon=True)
    restart.start()
    faults[f"tracking server down {OUTAGE_S:.0f} s"] = during > before
    print(f"outage: checkpointed step {before} -> {during} while the server was down", flush=True)
    # 3. a stop (SIGTERM, as `hardneg stop` sends) and a resume
    # by checkpoints, not logged metrics: after the outage the outbox's backlog lags the training by many steps
    wait_until(lambda: saved_step(run_dir) >= min(total - 40, during + 20), proc, "steps after the outage")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=600)
    restart.join(timeout=300)
    stopped_at = saved_step(run_dir)
    print(f"stop: exit {proc.returncode}, checkpoint at step {stopped_at}", flush=True)
    resumed = train(bad_shards, "soak", "--resume")
    resumed.wait()
    wall_s = time.monotonic() - start
    faults[f"stop (SIGTERM) at step {stopped_at} + resume"] = (
        proc.returncode == 130 and stopped_at < total and resumed.returncode == 0
    )

    steps = [s for s, _ in logged(server.url, "soak")]
    skipped = logged(server.url, "soak", "data_skipped")
    data_skipped = int(skipped[-1][1]) if skipped else 0
    faults["corrupt shard (3 bad images)"] = data_skipped > 0 and resumed.returncode == 0
    final = checkpoint_step = saved_step(run_dir)
    missing = len(set(range(1, total + 1)) - set(steps))
    duplicated = len(steps) - len(set(steps))
    server.stop()

    rows = [
        ("faults injected", str(len(faults))),
        ("faults survived", str(sum(faults.values()))),
        *((f"  {name}", "survived" if ok else "NOT survived") for name, ok in faults.items()),
        ("final step vs expected", f"{final} / {total}"),
        ("metric steps missing (loss)", f"{missing} (duplicated: {duplicated})"),
        ("data skipped (reads of the 3 bad images)", str(data_skipped)),
        ("wall time vs clean run", f"{wall_s:.0f} s vs {clean_s:.0f} s ({wall_s / clean_s:.2f}x)"),
    ]
    width = max(len(k) for k, _ in rows)
    print(
        f"\nsoak {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.platform()}, {os.cpu_count()} CPUs; "
        f"configs/demo.yaml, {EPOCHS} epochs x {spe} steps, Ray Train 2 CPU workers"
    )
    print(f"| {'what':{width}s} | result |\n|{'-' * (width + 2)}|--------|")
    for key, value in rows:
        print(f"| {key:{width}s} | {value} |")
    ok = all(faults.values()) and final == checkpoint_step == total and missing == 0 and duplicated == 0
    if ok:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"logs kept in {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
