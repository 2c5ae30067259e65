"""cluster.storage_path on S3 (a moto server on 127.0.0.1): the driver-side checks of pipeline/app/train_command.py,
and (slow) a Ray Train run whose checkpoints go to S3 through ray.train.report."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import urllib.request

import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from conftest import free_port, tiny_config  # noqa: E402

from pipeline import checkpoint, config  # noqa: E402
from pipeline.app import train_command  # noqa: E402
from pipeline.errors import HardnegError  # noqa: E402

BUCKET = "hardneg-test"
pytestmark = pytest.mark.server  # moto on 127.0.0.1


@pytest.fixture
def s3(monkeypatch):
    """s3://BUCKET on a fresh moto server; AWS_ENDPOINT_URL points s3fs, pyarrow (Ray) and boto3 at it."""
    import boto3
    import s3fs

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"))
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    s3fs.S3FileSystem.clear_instance_cache()  # no filesystem left over from another endpoint
    try:
        yield f"s3://{BUCKET}"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def _put_checkpoint(cfg: config.Config, url: str, step: int) -> None:
    import fsspec

    state = {
        "model": {},
        "optimizer": {},
        "step": step,
        "epoch": 1,
        "mlflow_run_id": None,
        "config": config.to_dict(cfg),
        "rng": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        local = checkpoint.write(state, os.path.join(tmp, "ckpt"))
        fs, path = fsspec.core.url_to_fs(url)
        fs.put(local + "/", path, recursive=True)


def test_driver_side_checks_on_s3(s3, tmp_path, digits_shards):
    runs = f"{s3}/runs"
    cfg = tiny_config(tmp_path, digits_shards, f"cluster.storage_path={runs}", "tracking.run_name=r1")
    train_command._check_writable(runs)
    assert train_command.latest_run_name(runs) is None
    assert train_command.choose_run_name(cfg, None) == "r1"

    _put_checkpoint(cfg, f"{runs}/r1/checkpoint_000011", 11)
    time.sleep(1.1)  # S3 stamps LastModified in seconds
    _put_checkpoint(cfg, f"{runs}/r2/checkpoint_000022", 22)
    assert checkpoint.latest(f"{runs}/r2") == f"{runs}/r2/checkpoint_000022"
    assert train_command.latest_run_name(runs) == "r2"
    assert train_command.choose_run_name(cfg, "") == "r2"  # --resume without a name: the run written last
    with pytest.raises(HardnegError, match=r"run 'r1' already exists under s3://.*--resume r1"):
        train_command.choose_run_name(cfg, None)
    with pytest.raises(HardnegError, match="run 'nope' has no checkpoint"):
        train_command.choose_run_name(cfg, "nope")

    # the whole driver path, up to (not including) Ray: a resume from a different config is refused
    other = tiny_config(
        tmp_path,
        digits_shards,
        "cluster.launcher=ray",  # refused before Ray starts
        f"cluster.storage_path={runs}",
        "tracking.run_name=r2",
        "loss.temperature=0.2",
    )
    with pytest.raises(HardnegError, match=r"cannot resume.*loss\.temperature: 0\.5 -> 0\.2"):
        train_command.train_run(other, resume="r2")


def test_unreachable_s3_storage_is_one_line(s3, tmp_path, digits_shards, monkeypatch):
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    cfg = tiny_config(tmp_path, digits_shards, "cluster.launcher=ray", f"cluster.storage_path={s3}/runs")
    with pytest.raises(HardnegError, match=rf"cannot write to cluster.storage_path={s3}/runs: ") as e:
        train_command.train_run(cfg)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "mlflow.db").exists()  # before any MLflow run or Ray


@pytest.mark.ray
def test_ray_train_checkpoints_to_s3(s3, tmp_path, digits_shards, monkeypatch, request, own_ray):
    ray_tmp = tempfile.mkdtemp(prefix="hns3-", dir="/tmp")  # short: Ray's socket paths live under it
    request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))
    monkeypatch.setenv("HARDNEG_RAY_TMP", ray_tmp)
    runs = f"{s3}/runs"
    cfg = tiny_config(
        tmp_path,
        digits_shards,
        "cluster.launcher=ray",
        f"cluster.storage_path={runs}",
        "tracking.run_name=s3run",
        "train.knn_every_epochs=0",
    )
    result = train_command.train_run(cfg)  # a private Ray started here (own_ray) inherits AWS_ENDPOINT_URL
    steps = 1347 // 128
    assert result["step"] == steps
    assert result["checkpoint"].startswith(f"{runs}/s3run/")
    assert checkpoint.load(checkpoint.latest(f"{runs}/s3run"))["step"] == steps
    assert train_command.latest_run_name(runs) == "s3run"
