"""`hardneg launch / status / stop` against a real local head (`ray start --head` on 127.0.0.1) that the
test starts and stops itself; plus the launcher's resource check against that cluster.

The head runs in its own process group in a private temp dir and is killed by group (never `ray stop`,
which would stop every Ray instance on a shared machine); a watchdog kills it too if pytest dies.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
from conftest import free_port
from mlflow.tracking import MlflowClient

from pipeline import checkpoint

pytestmark = [
    pytest.mark.ray,
    pytest.mark.server,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups"),
]

BIN = os.path.dirname(sys.executable)


def _wait_for_dashboard(address: str, token: str, head: subprocess.Popen, log: str, timeout_s: float = 180) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start --head exited {head.returncode}:\n{open(log).read()[-3000:]}")
        try:
            JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"}).list_jobs()
            return
        except Exception:  # noqa: BLE001 -- the dashboard is still starting: poll again
            time.sleep(1)
    pytest.fail(f"the head's dashboard did not answer at {address}:\n{open(log).read()[-3000:]}")


@pytest.fixture(scope="module")
def ray_head():
    """(dashboard URL, GCS address, token) of a 2-CPU head bound to 127.0.0.1 with token authentication
    (Ray's default from 2.61 on); torn down however the tests end."""
    tmp = tempfile.mkdtemp(prefix="hnhead-", dir="/tmp")  # short: Ray's socket paths live under it
    gcs, dashboard = free_port(), free_port()
    log = os.path.join(tmp, "head.log")
    token = uuid.uuid4().hex
    env = os.environ | {
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
    }
    with open(log, "w") as out:
        head = subprocess.Popen(
            [
                os.path.join(BIN, "ray"),
                "start",
                "--head",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--port={gcs}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                f"--ray-client-server-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}",
                "--num-cpus=2",
                "--num-gpus=0",
                f"--temp-dir={tmp}",
                "--disable-usage-stats",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    # if pytest itself is killed, the watchdog still takes the head's process group down
    watchdog = subprocess.Popen(
        [
            "sh",
            "-c",
            f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 2; done; kill -KILL -{head.pid}; rm -rf {tmp}",
        ],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_dashboard(address, token, head, log)
        yield address, f"127.0.0.1:{gcs}", token
    finally:
        # `ray start --block` takes over 10 s to unwind on SIGTERM; the head's state is thrown away with tmp
        for sig, wait in ((signal.SIGTERM, 2), (signal.SIGKILL, 5)):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and head.poll() is None:
                time.sleep(0.2)
        try:
            os.killpg(head.pid, signal.SIGKILL)  # the group outlives its leader: take the rest too
        except ProcessLookupError:
            pass
        watchdog.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def hardneg(*args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [os.path.join(BIN, "hardneg"), *args], capture_output=True, text=True, timeout=timeout, env=os.environ | env
    )
    print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
    return proc


def without_ray_core_log(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """``proc`` with the lines Ray's C++ core writes to stderr removed (e.g. its warning, in a loopback-only
    namespace, that 8.8.8.8 is unreachable): they are Ray's, not ours."""
    core = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+ [A-Z] \d+ \d+\] \S+\.cc:\d+: ")
    kept = "".join(line for line in proc.stderr.splitlines(keepends=True) if not core.match(line))
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout, kept)


def job_id_of(stdout: str) -> str:
    match = re.search(r"submitted job (\S+)", stdout)
    assert match, stdout
    return match.group(1)


def test_launch_status_stop_on_a_local_head(ray_head, tmp_path, digits_shards):
    address, _, token = ray_head
    # only the token, not RAY_AUTH_MODE: the client sends it once the cluster asks for one
    client_env = {"RAY_AUTH_TOKEN": token}
    remote = [
        f"data.path={digits_shards}",
        f"cluster.storage_path={tmp_path / 'runs'}",
        "cluster.num_workers=1",  # one CPU each: the two jobs run side by side on the 2-CPU head
        "data.shuffle_buffer=200",
        "augment.image_size=8",
        "model.width=4",
        "model.proj_hidden_dim=32",
        "model.proj_dim=16",
        "train.global_batch_size=128",
        "train.epochs=1",
        "train.knn_every_epochs=0",
        "eval.knn_k=20",
    ]
    long_db, tiny_db = tmp_path / "long.db", tmp_path / "tiny.db"  # one SQLite file per job: no lock contention

    # a long job, not followed (launched first, so its start-up overlaps the tiny job's run and checks below)
    started = hardneg(
        "launch",
        "--address",
        address,
        "--no-pip",
        "--no-wait",
        *remote,
        f"tracking.uri=sqlite:///{long_db}",
        "train.epochs=500",
        "tracking.run_name=job2",
        env=client_env,
    )
    assert started.returncode == 0, started.stderr
    long_job = job_id_of(started.stdout)

    # a tiny training job, followed to the end: id printed, logs streamed, SUCCEEDED
    done = hardneg(
        "launch",
        "--address",
        address,
        "--no-pip",
        *remote,
        f"tracking.uri=sqlite:///{tiny_db}",
        "tracking.run_name=job1",
        env=client_env,
    )
    assert done.returncode == 0, done.stderr
    job = job_id_of(done.stdout)
    assert f"epoch 1/1 step {1347 // 128}/{1347 // 128}" in done.stdout and f"job {job}: SUCCEEDED" in done.stdout
    assert hardneg("status", job, "--address", address, env=client_env).stdout.startswith(f"{job}: SUCCEEDED")
    assert checkpoint.load(str(tmp_path / "runs" / "job1"))["step"] == 1347 // 128  # written by the job on the cluster
    assert hardneg("stop", job, "--address", address, env=client_env).stdout.strip() == f"{job}: already SUCCEEDED"
    missing = hardneg("status", "raysubmit_nosuchjob", "--address", address, env=client_env)
    assert missing.returncode == 2 and "raysubmit_nosuchjob" in missing.stderr

    # the long job: PENDING/RUNNING, then stopped
    job = long_job
    seen = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = hardneg("status", job, "--address", address, env=client_env).stdout.split(": ")[1].split()[0]
        seen.append(status)
        if status == "RUNNING" or status in ("FAILED", "SUCCEEDED", "STOPPED"):
            break
        time.sleep(1)
    assert seen[-1] == "RUNNING" and set(seen) <= {"PENDING", "RUNNING"}, seen
    while time.monotonic() < deadline and checkpoint.latest(str(tmp_path / "runs" / "job2")) is None:
        time.sleep(1)  # training for real: its MLflow run exists (opened before the first checkpoint)
    client = MlflowClient(f"sqlite:///{long_db}")
    run_id = next(
        r.info.run_id
        for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
        if r.info.run_name == "job2"
    )
    assert client.get_run(run_id).info.status == "RUNNING"
    assert hardneg("stop", job, "--address", address, env=client_env).stdout.strip() == f"{job}: STOPPED"
    # the job's driver got SIGTERM and unwound like Ctrl-C: its MLflow run is not left RUNNING
    while time.monotonic() < deadline and client.get_run(run_id).info.status == "RUNNING":
        time.sleep(1)
    assert client.get_run(run_id).info.status == "KILLED"
    assert hardneg("status", job, "--address", address, env=client_env).stdout.startswith(f"{job}: STOPPED")
    # ... and the Ray Train workers checkpointed the step they had reached before returning (STOP_REQUESTED path):
    # the driver's last words name that step, and it is the newest checkpoint in the run directory
    from ray.job_submission import JobSubmissionClient

    logs = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"}).get_job_logs(job)
    stopped = re.search(r"stopped at step (\d+)", logs)
    assert stopped, logs[-3000:]
    assert checkpoint.load(checkpoint.latest(str(tmp_path / "runs" / "job2")))["step"] == int(stopped.group(1)) > 0


def test_more_workers_or_gpus_than_the_cluster_has(ray_head, tmp_path, digits_shards):
    from test_cli import assert_one_line_error

    _, gcs, token = ray_head
    common = [
        f"data.path={digits_shards}",
        f"cluster.storage_path={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"cluster.address={gcs}",
    ]
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}  # an explicit address never guesses the token
    cases = (
        ("cluster.num_workers=4", "needs 4 CPUs; the Ray cluster has 2"),
        ("cluster.use_gpu=true", "needs 2 GPUs; the Ray cluster has 0"),
    )
    # the two refusals side by side: each is a CLI process that spends its seconds importing and connecting
    procs = [
        subprocess.Popen(
            [os.path.join(BIN, "hardneg"), "train", *common, override],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ | env,
        )
        for override, _ in cases
    ]
    for proc, (_, needs) in zip(procs, cases, strict=True):
        out, err = proc.communicate(timeout=300)
        print(out[-4000:], err[-2000:], sep="\n")
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        assert_one_line_error(without_ray_core_log(done), needs)
    assert not (tmp_path / "mlflow.db").exists()  # refused before an MLflow run was created
