"""`hardneg prep ... --ray ADDRESS`: one Ray task per shard (cluster/prep.py), same bytes as a local run."""

from __future__ import annotations

import hashlib
import os

import pytest

from data_prep import synthetic
from data_prep.manifest import verify
from data_prep.prep import prepare

ray = pytest.importorskip("ray")


@pytest.mark.slow
def test_ray_tasks_write_the_same_shards(tmp_path):
    from cluster.prep import ray_mapper

    src = synthetic.write_cifar10(str(tmp_path / "c10.tar.gz"), n_train=200, n_test=40)
    local = prepare(f"cifar10:{src}", str(tmp_path / "local"), shard_size=50)
    try:
        on_ray = prepare(f"cifar10:{src}", str(tmp_path / "ray"), shard_size=50, mapper=ray_mapper("local"))
    finally:
        ray.shutdown()
    assert on_ray["splits"] == local["splits"] and verify(str(tmp_path / "ray")) == []
    for name in os.listdir(tmp_path / "local"):
        if name.endswith(".tar"):
            a, b = (hashlib.sha256((tmp_path / d / name).read_bytes()).hexdigest() for d in ("local", "ray"))
            assert a == b, name
