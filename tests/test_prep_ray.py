"""`hardneg prep ... --ray ADDRESS`: one Ray task per shard (cluster/prep.py), same bytes as a local run."""

from __future__ import annotations

import hashlib
import os

import pytest

from data_prep import synthetic
from data_prep.manifest import verify
from data_prep.prep import prepare

pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("shared_ray")]  # "local": the Ray this process is connected to


def test_ray_tasks_write_the_same_shards(tmp_path):
    from cluster.prep import ray_mapper

    src = synthetic.write_cifar10(str(tmp_path / "c10.tar.gz"), n_train=200, n_test=40)
    local = prepare(f"cifar10:{src}", str(tmp_path / "local"), shard_size=50)
    on_ray = prepare(f"cifar10:{src}", str(tmp_path / "ray"), shard_size=50, mapper=ray_mapper("local"))
    assert on_ray["splits"] == local["splits"] and verify(str(tmp_path / "ray")) == []
    for name in os.listdir(tmp_path / "local"):
        if name.endswith(".tar"):
            a, b = (hashlib.sha256((tmp_path / d / name).read_bytes()).hexdigest() for d in ("local", "ray"))
            assert a == b, name


def test_ray_workers_without_the_listing_file_list_the_folder_again(tmp_path):
    """As on another node: the imagefolder listing's file is not there for the Ray workers; they rebuild and
    check it, and the shards are the local run's bytes."""
    from cluster.prep import map_on_ray

    folder = synthetic.write_jpeg_folder(str(tmp_path / "images"), 120)
    local = prepare(f"imagefolder:{folder}", str(tmp_path / "local"), shard_size=40)
    listings: list[str] = []

    def elsewhere(fn, context, jobs):
        listings.append(context.listing.db)
        os.remove(context.listing.db)  # the driver's file, absent where the tasks run
        yield from map_on_ray(fn, context, jobs, "local")

    on_ray = prepare(f"imagefolder:{folder}", str(tmp_path / "ray"), shard_size=40, mapper=elsewhere)
    assert on_ray["splits"] == local["splits"] and verify(str(tmp_path / "ray")) == []
    for name in os.listdir(tmp_path / "local"):
        if name.endswith(".tar"):
            assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name
    assert listings and not os.path.exists(listings[0])  # the rebuilt file went with the driver's source
