"""The object-store path against a real S3-compatible server (moto, server mode) on 127.0.0.1.

The endpoint reaches s3fs the way a user passes it: the standard AWS_ENDPOINT_URL variable, which
botocore (under s3fs) honours. Nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import os
import time

import pytest
from conftest import free_port

from data_prep import synthetic
from data_prep.manifest import read_manifest, verify
from data_prep.prep import prepare
from pipeline.errors import HardnegError

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
pytestmark = pytest.mark.server  # moto on 127.0.0.1

BUCKET = "hardneg-test"


def _use_endpoint(monkeypatch, port: int) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def server():
    """A moto S3 server on a free 127.0.0.1 port for this module; stopped at the end."""
    port = free_port()
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    srv.start()
    yield port
    srv.stop()


@pytest.fixture
def s3(server, monkeypatch, tmp_path):
    _use_endpoint(monkeypatch, server)
    monkeypatch.setenv("HARDNEG_CACHE_DIR", str(tmp_path / "cache"))
    fs = s3fs.S3FileSystem()
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    yield fs
    fs.rm(BUCKET, recursive=True)
    s3fs.S3FileSystem.clear_instance_cache()


def test_cifar_from_s3_to_s3_both_formats(s3, tmp_path, monkeypatch):
    import data_prep.jobs as jobs
    from pipeline import augment, data
    from pipeline.config import AugmentConfig

    local = synthetic.write_cifar10(str(tmp_path / "cifar-10-python.tar.gz"), n_train=120, n_test=30)
    s3.put_file(local, f"{BUCKET}/raw/cifar-10-python.tar.gz")
    src, out = f"cifar10:s3://{BUCKET}/raw/cifar-10-python.tar.gz", f"s3://{BUCKET}/prepared/c10"
    fmt = "both" if __import__("data_prep.ffcv", fromlist=["x"]).unavailable() is None else "wds"
    manifest = prepare(src, out, shard_size=50, format=fmt, workers=2)
    assert read_manifest(out) == manifest and verify(out) == []
    keys = sorted(k.rsplit("/", 1)[1] for k in s3.find(f"{BUCKET}/prepared/c10"))
    want = [
        "manifest.json",
        "prep_run.json",
        "test-000000.tar",
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    ]
    assert keys == sorted(want + (["test.beton", "train.beton"] if fmt == "both" else [])), "no temp or marker left"

    written = []
    real = jobs.write_shard
    monkeypatch.setattr(jobs, "write_shard", lambda *a: written.append(a[1]) or real(*a))
    again = prepare(src, out, shard_size=50, format=fmt)
    assert written == [] and again["splits"] == manifest["splits"]

    views = augment.TwoViews(augment.view_transform(AugmentConfig()))
    v1, v2, labels = next(data.train_batches(out, "train", views, 8, rank=0, seed=0))
    assert v1.shape == (8, 3, 32, 32) and labels.shape == (8,)
    if fmt == "both":
        path = data._ffcv_file(out, manifest, "train", None)
        assert (
            path.startswith(str(tmp_path / "cache"))
            and os.path.getsize(path) == manifest["splits"]["train"]["ffcv"]["bytes"]
        )


def test_tinyimagenet_zip_read_in_place_from_s3(s3, tmp_path):
    local = synthetic.write_tinyimagenet(str(tmp_path / "tiny.zip"))
    s3.put_file(local, f"{BUCKET}/raw/tiny-imagenet-200.zip")
    manifest = prepare(f"tinyimagenet:s3://{BUCKET}/raw/tiny-imagenet-200.zip", str(tmp_path / "out"))
    assert {k: v["num_samples"] for k, v in manifest["splits"].items()} == {"train": 12, "val": 6}
    assert verify(str(tmp_path / "out")) == []


def test_unreachable_object_store_fails_fast_with_one_line(monkeypatch, tmp_path, capsys):
    from pipeline.app.cli import main

    _use_endpoint(monkeypatch, free_port())  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's retries (standard variable)
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 2)  # s3fs's own retry loop
    start = time.monotonic()
    with pytest.raises(HardnegError, match=r"cannot write to OUT 's3://nobucket/out'.*Could not connect") as e:
        prepare("builtin:digits", "s3://nobucket/out")
    assert "\n" not in str(e.value)
    local = synthetic.write_cifar10(str(tmp_path / "c10.tar.gz"), n_train=5, n_test=5)
    with pytest.raises(HardnegError, match=r"cannot read 's3://nobucket/c10.tar.gz'"):
        prepare("cifar10:s3://nobucket/c10.tar.gz", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and os.path.exists(local)
    assert main(["prep", "builtin:digits", "s3://nobucket/out", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hardneg: error: cannot write to OUT")
    assert time.monotonic() - start < 30, "bounded retries"
