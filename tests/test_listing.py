"""The imagefolder listing on disk (data_prep/listing.py) and the numpy shard plan: the same order, digest and
plan as the in-memory versions they replaced, rebuilt where the file is missing, safe across fork."""

from __future__ import annotations

import gc
import hashlib
import multiprocessing
import os
import pickle
import socket
import subprocess
import sys
import zlib

import fsspec
import numpy as np
import pytest
from PIL import Image

from data_prep.archive import FolderTree
from data_prep.errors import HardnegError
from data_prep.plan import plan_shards
from data_prep.sources import SPLIT_DIRS, ImageFolderSource, _subdirs, is_image_name


def _old_listing(path: str) -> dict:
    """What ImageFolderSource held in memory before the listing moved to disk (its code, verbatim in effect)."""
    fs, root = fsspec.core.url_to_fs(path)
    top = _subdirs(fs, root)
    split_names = [s for s in SPLIT_DIRS if s in top] if "train" in top else []
    prefixes = {s: s + "/" for s in split_names} or {"train": ""}
    tree = FolderTree(path)
    files: dict = {s: [] for s in prefixes}
    for rel in tree.names:
        for split, prefix in prefixes.items():
            parts = rel[len(prefix) :].split("/") if rel.startswith(prefix) else []
            if len(parts) >= 2 and not parts[0].startswith(".") and is_image_name(rel[len(prefix) :]):
                files[split].append((parts[0], rel))
    classes = sorted({c for fl in files.values() for c, _ in fl})
    label_of = {c: i for i, c in enumerate(classes)}
    ordered = {s: [(label_of[c], rel) for c, rel in sorted(fl)] for s, fl in files.items()}
    digest = hashlib.sha256(repr(sorted(tree.names.items())).encode()).hexdigest()
    return {"classes": classes, "files": ordered, "outside": tree.outside, "count": len(tree.names), "digest": digest}


def _image(path, colour=(1, 2, 3), size=(4, 4)) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="PNG")


def _awkward_tree(root) -> str:
    """Splits, classes that are prefixes of each other, hidden files and folders, non-images, unicode names,
    a link out of PATH, a link to a folder inside, and (where the filesystem allows) a non-UTF-8 name."""
    root = str(root)
    for split in ("train", "val"):
        for cls in ("a", "a-b", "B", "é", "z"):
            for name in ("2.png", "10.png", "x.JPG", "é.png", "notes.txt", ".hidden.png"):
                _image(os.path.join(root, split, cls, name))
        _image(os.path.join(root, split, ".secret", "1.png"))
        _image(os.path.join(root, split, "a", "deep", "er.png"))
    _image(os.path.join(root, "train", "only-train", "1.png"))
    _image(os.path.join(root, "loose.png"))
    outside = os.path.join(os.path.dirname(root), "outside.png")
    _image(outside)
    os.symlink(outside, os.path.join(root, "train", "a", "link.png"))
    os.symlink(os.path.join(root, "val", "z"), os.path.join(root, "train", "z-link"))
    try:
        with open(os.path.join(os.fsencode(root), b"train", b"B", b"bad-\xff.png"), "wb") as f:
            f.write(b"not an image")
    except OSError:  # a filesystem that refuses non-UTF-8 names
        pass
    return root


def _new_listing(src: ImageFolderSource) -> dict:
    files: dict = {s: [] for s in src.sizes}
    for split, label, rel in src.listing.names():
        files[split].append((label, rel))
    sig = src.signature()
    return {
        "classes": src.classes,
        "files": files,
        "outside": list(src.listing.outside),
        "count": sig["files"],
        "digest": sig["listing"],
    }


@pytest.mark.parametrize("layout", ["splits", "flat"])
def test_listing_equals_the_in_memory_order_and_digest(tmp_path, layout):
    root = _awkward_tree(tmp_path / "data")
    path = root if layout == "splits" else os.path.join(root, "train")
    src = ImageFolderSource(path, f"imagefolder:{path}")
    old, new = _old_listing(path), _new_listing(src)
    assert old["outside"] and old["count"] > 30  # the awkward cases are there
    assert new == old
    assert src.sizes == {s: len(fl) for s, fl in old["files"].items()}
    for split, fl in old["files"].items():
        for i in (0, len(fl) // 2, len(fl) - 1):
            assert src.listing.entry(split, i) == fl[i]


def test_listing_of_an_fsspec_folder_walks_it_like_find(tmp_path):
    fs = fsspec.filesystem("memory")
    base = f"/listing-{tmp_path.name}"
    for split in ("train", "val"):
        for cls in ("cat", "cat-2", "dog"):
            for i in (1, 2, 10):
                fs.pipe(f"{base}/{split}/{cls}/{i}.png", b"x" * i)
        fs.pipe(f"{base}/{split}/.hidden/1.png", b"x")
    try:
        src = ImageFolderSource(f"memory://{base}", "imagefolder:memory://" + base)
        old, new = _old_listing(f"memory://{base}"), _new_listing(src)
        assert new == old and sum(src.sizes.values()) == 18
    finally:
        fs.rm(base, recursive=True)


def test_listing_file_is_removed_with_the_source(tmp_path):
    root = _awkward_tree(tmp_path / "data")
    src = ImageFolderSource(root, f"imagefolder:{root}")
    db = src.listing.db
    folder = os.path.dirname(db)
    assert os.path.isfile(db) and not [n for n in os.listdir(folder) if os.path.basename(db) + "." in n]
    del src
    gc.collect()
    assert not os.path.exists(db)


def test_listing_rebuilt_where_its_file_is_missing(tmp_path):
    """A Ray worker on another node unpickles the source without the driver's file: it lists the folder again."""
    root = _awkward_tree(tmp_path / "data")
    src = ImageFolderSource(root, f"imagefolder:{root}")
    expected = [src.listing.entry("val", i) for i in range(src.sizes["val"])]
    blob = pickle.dumps(src)
    assert len(blob) < 4000  # the listing travels as its file name and digest, not the names
    os.remove(src.listing.db)
    copy = pickle.loads(blob)
    assert [copy.listing.entry("val", i) for i in range(copy.sizes["val"])] == expected
    assert copy.record("val", 0).label == expected[0][0]
    # The folder changed between the driver's listing and the worker's: an error, not other labels.
    os.remove(copy.listing.db)
    _image(os.path.join(root, "val", "z", "new.png"))
    again = pickle.loads(blob)
    for _ in range(2):  # and again on the next record: no listing of the changed folder is kept
        with pytest.raises(HardnegError, match=r"changed while it was read \(\d+ files listed at the start, \d+ now\)"):
            again.record("val", 0)
        assert not os.path.exists(again.listing.db)


def _entries_in_child(src, split, n, queue):
    queue.put([src.listing.entry(split, i) for i in range(n)])


def test_listing_connection_is_not_shared_across_fork(tmp_path):
    root = _awkward_tree(tmp_path / "data")
    src = ImageFolderSource(root, f"imagefolder:{root}")
    n = src.sizes["train"]
    mine = [src.listing.entry("train", i) for i in range(n)]  # the parent's connection is open
    parent_conn = src.listing._conn
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    children = [ctx.Process(target=_entries_in_child, args=(src, "train", n, queue)) for _ in range(2)]
    for child in children:
        child.start()
    got = [queue.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert got == [mine, mine]
    assert src.listing._conn is parent_conn and [src.listing.entry("train", i) for i in range(n)] == mine
    assert os.path.isfile(src.listing.db)  # a child's exit does not remove the parent's file


def _old_plan(sizes: dict, shard_size: int, seed: int) -> list[tuple[str, int, tuple]]:
    """plan_shards as it was with tuples of Python ints."""
    specs = []
    for split, n in sizes.items():
        rng = np.random.default_rng([int(seed), zlib.crc32(split.encode("utf-8"))])
        order = rng.permutation(n).tolist()
        for index, start in enumerate(range(0, n, shard_size)):
            specs.append((split, index, tuple(order[start : start + shard_size])))
    return specs


@pytest.mark.parametrize(
    "sizes,shard_size,seed",
    [({"train": 1000, "test": 7}, 128, 3), ({"train": 5, "val": 0}, 1, 0), ({"train": 70000, "holdout": 513}, 512, 17)],
)
def test_numpy_plan_has_the_positions_of_the_tuple_plan(sizes, shard_size, seed):
    new = plan_shards(sizes, shard_size, seed)
    assert [(s.split, s.index, tuple(int(i) for i in s.records)) for s in new] == _old_plan(sizes, shard_size, seed)
    assert all(s.records.dtype == np.int64 for s in new)
    assert len({s.records.base is not None for s in new if len(s.records)}) <= 1  # slices of one permutation


def test_listings_of_killed_processes_are_swept(tmp_path, monkeypatch):
    monkeypatch.setenv("HARDNEG_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "listings"
    folder.mkdir(parents=True)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, host, hexes = int(gone.stdout), socket.gethostname(), "0" * 32
    left = [
        f"{dead}-{hexes}-{host}.sqlite",
        f".{dead}-{hexes}-{host}.sqlite.tmp-{hexes}",
        f"{dead}-{hexes}-{host}.sqlite.scratch-1",
    ]
    kept = [f"{os.getpid()}-{hexes}-{host}.sqlite", f"{dead}-{hexes}-other-{host}x.sqlite", "notes.txt"]
    for name in left + kept:
        (folder / name).write_bytes(b"x")
    root = _awkward_tree(tmp_path / "data")
    src = ImageFolderSource(root, f"imagefolder:{root}")
    assert sorted(os.listdir(folder)) == sorted(kept + [os.path.basename(src.listing.db)])


def test_unwritable_listing_folder_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("a file, not a folder")
    monkeypatch.setenv("HARDNEG_CACHE_DIR", str(tmp_path / "cache"))
    root = _awkward_tree(tmp_path / "data")
    with pytest.raises(
        HardnegError, match=r"cannot list imagefolder path .*NotADirectoryError.*\(set HARDNEG_CACHE_DIR"
    ) as e:
        ImageFolderSource(root, f"imagefolder:{root}")
    assert "\n" not in str(e.value)
