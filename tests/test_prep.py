"""Round trips, idempotence, verification and bad input for the offline sharding side (data_prep)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import uuid

import fsspec
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem
from PIL import Image
from sklearn.datasets import load_digits

import data_prep.wds as wds
from data_prep.manifest import RUN_NAME, read_manifest, shard_urls, verify
from data_prep.plan import plan_shards
from data_prep.prep import prepare
from data_prep.schema import MANIFEST_NAME, sample_key
from data_prep.sources import open_source
from pipeline.errors import HardnegError


def read_shard(data: bytes) -> list[dict]:
    """Samples of tar bytes, grouped by key, in order: {"__key__", "png", "cls", "json"}."""
    samples: dict[str, dict] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    return list(samples.values())


def decode(sample: dict) -> tuple[np.ndarray, int, dict]:
    """(RGB pixels, label, meta) of one sample."""
    with Image.open(io.BytesIO(sample["png"])) as img:
        assert img.mode == "RGB"
        pixels = np.asarray(img)
    return pixels, int(sample["cls"].decode("ascii")), json.loads(sample["json"])


def leftovers(path) -> list[str]:
    """Temp and probe files left in a local directory."""
    return [n for n in os.listdir(path) if n.startswith(".")]


@pytest.fixture(scope="module")
def digits_out(tmp_path_factory):
    """Digits prepared once into a local directory, with small shards: (out, manifest)."""
    out = tmp_path_factory.mktemp("digits") / "shards"
    return str(out), prepare("builtin:digits", str(out), shard_size=400)


def test_digits_round_trip(digits_out):
    out, manifest = digits_out
    digits = load_digits()
    expected_pixels = np.rint(digits.images * 255 / 16).astype(np.uint8)
    assert manifest["version"] == 1 and manifest["dataset"] == "builtin:digits"
    prep = dict(manifest["prep"])
    assert len(prep.pop("fingerprint")) == 64
    assert prep == {
        "shard_size": 400,
        "seed": 0,
        "test_size": 300,
        "format": "wds",
        "image_format": "auto",
        "strict": False,
        "shard_bytes": None,
        "val_fraction": 0.1,
        "val_seed": 0,
        "val_split": "holdout",
    }  # digits hold 10% of train out
    assert manifest["image"] == {"height": 8, "width": 8, "channels": 3}
    assert manifest["skipped"] == []
    assert read_manifest(out) == manifest
    seen = {}
    for split, count in (("train", 1347), ("test", 300), ("holdout", 150)):
        info = manifest["splits"][split]
        assert info["num_samples"] == count
        assert info["classes"] == [str(c) for c in range(10)]
        assert [s["num_samples"] for s in info["shards"]] == [400] * (count // 400) + [count % 400]
        indices = []
        for shard, url in zip(info["shards"], shard_urls(out, manifest, split), strict=True):
            assert os.path.isabs(url) and url.endswith(shard["path"])
            data = open(url, "rb").read()
            assert len(data) == shard["bytes"]
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
            samples = read_shard(data)
            assert len(samples) == shard["num_samples"]
            labels = set()
            for sample in samples:
                pixels, label, meta = decode(sample)
                i = meta["index"]
                assert sample["__key__"] == sample_key(split, i)
                assert label == meta["label"] == digits.target[i]
                assert meta["source"] == "builtin:digits" and meta["file"] is None
                assert pixels.shape == (8, 8, 3)
                assert (pixels == expected_pixels[i][..., None]).all()
                labels.add(label)
                indices.append(i)
            assert labels == set(range(10)), "every shard mixes all classes"
        assert len(indices) == len(set(indices)) == count
        assert indices != sorted(indices), "sample order is shuffled"
        seen[split] = set(indices)
    assert seen["train"] | seen["test"] | seen["holdout"] == set(range(1797))
    assert not seen["train"] & seen["test"] and not seen["holdout"] & (seen["train"] | seen["test"])
    test_counts = np.bincount(digits.target[sorted(seen["test"])], minlength=10)
    assert test_counts.min() >= 29 and test_counts.max() <= 31, "test split is stratified"
    assert verify(out) == []
    assert leftovers(out) == []


def test_rerun_writes_nothing(digits_out, tmp_path):
    out, first = digits_out
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = {n: os.stat(copy / n) for n in os.listdir(copy) if n.endswith(".tar")}
    second = prepare("builtin:digits", str(copy), shard_size=400)
    for split in ("train", "test"):
        assert second["splits"][split] == first["splits"][split]
    for name, st in before.items():
        now = os.stat(copy / name)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), f"{name} was rewritten"
    assert verify(str(copy)) == [] and leftovers(copy) == []


def test_shard_bytes_are_deterministic(tmp_path):
    records = open_source("builtin:digits").materialize().splits["test"][:20]
    a = wds.write_shard(records, str(tmp_path / "a-000000.tar"))
    b = wds.write_shard(records, str(tmp_path / "b-000000.tar"))
    assert a["sha256"] == b["sha256"] and a["bytes"] == b["bytes"] and a["num_samples"] == 20
    assert (tmp_path / "a-000000.tar").read_bytes() == (tmp_path / "b-000000.tar").read_bytes()


def test_fewer_shards_on_rerun_removes_stale_ones(tmp_path):
    out = str(tmp_path / "o")
    prepare("builtin:digits", out, shard_size=300)
    manifest = prepare("builtin:digits", out, shard_size=1000)
    listed = {s["path"] for v in manifest["splits"].values() for s in v["shards"]}
    assert set(os.listdir(out)) == listed | {MANIFEST_NAME, RUN_NAME}
    assert verify(out) == []


def test_verify_finds_corrupt_and_missing_shards(digits_out, tmp_path):
    out, manifest = digits_out
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    train = [s["path"] for s in manifest["splits"]["train"]["shards"]]
    with open(copy / train[0], "r+b") as f:  # flip one byte inside the first PNG
        f.seek(600)
        byte = f.read(1)
        f.seek(600)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.remove(copy / train[1])
    problems = verify(str(copy))
    assert any(train[0] in p and "sha256" in p for p in problems), problems
    assert any(train[1] in p and "missing" in p for p in problems), problems
    with open(copy / train[2], "ab") as f:
        f.write(b"\0" * 512)
    assert any(train[2] in p and "bytes" in p for p in verify(str(copy)))


def test_verify_counts_samples(tmp_path):
    records = open_source("builtin:digits").materialize().splits["test"][:5]
    out = tmp_path / "o"
    out.mkdir()
    entry = wds.write_shard(records, str(out / "test-000000.tar"))
    manifest = {
        "version": 1,
        "splits": {"test": {"num_samples": 6, "classes": [], "shards": [dict(entry, num_samples=6)]}},
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    problems = verify(str(out))
    assert any("5 samples, manifest says 6" in p for p in problems), problems


def test_memory_round_trip():
    out = f"memory://hardneg-test-{uuid.uuid4().hex}/shards"
    fs, root = fsspec.core.url_to_fs(out)
    try:
        manifest = prepare("builtin:digits", out, shard_size=1000)
        assert read_manifest(out) == manifest
        urls = shard_urls(out, manifest, "train")
        assert urls == [f"{out}/train-000000.tar", f"{out}/train-000001.tar"]
        total = 0
        for url, shard in zip(urls, manifest["splits"]["train"]["shards"], strict=True):
            with fsspec.open(url, "rb") as f:
                data = f.read()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
            total += len(read_shard(data))
        assert total == 1347
        assert verify(out) == []
        assert not [p for p in fs.ls(root, detail=False) if os.path.basename(p).startswith(".")]
    finally:
        fs.rm(root.split("/shards")[0], recursive=True)


def save(path, img: Image.Image, fmt: str) -> None:
    """Save an image, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)


def make_folder(root, prefix=""):
    """A tiny imagefolder: cat/ with RGB PNG, grey PNG, palette PNG, corrupt PNG; dog/ with RGBA PNG, JPEG."""
    base = root / prefix if prefix else root
    rgb = Image.fromarray(np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3), "RGB")
    save(base / "cat" / "a_rgb.png", rgb, "PNG")
    save(base / "cat" / "b_grey.png", Image.fromarray(np.full((6, 6), 77, np.uint8), "L"), "PNG")
    save(base / "cat" / "c_palette.png", rgb.convert("P", palette=Image.ADAPTIVE, colors=8), "PNG")
    (base / "cat" / "d_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    rgba = Image.fromarray(np.full((3, 3, 4), 200, np.uint8), "RGBA")
    save(base / "dog" / "e_rgba.png", rgba, "PNG")
    save(base / "dog" / "f.jpg", Image.new("RGB", (7, 7), (10, 120, 240)), "JPEG")
    (base / "dog" / "notes.txt").write_text("not an image")
    return base


def test_imagefolder_converts_to_rgb_and_skips_corrupt(tmp_path):
    make_folder(tmp_path / "pets")
    out = tmp_path / "out"
    manifest = prepare(f"imagefolder:{tmp_path / 'pets'}", str(out), shard_size=2)
    assert list(manifest["splits"]) == ["train"]
    train = manifest["splits"]["train"]
    assert train["classes"] == ["cat", "dog"] and train["num_samples"] == 5
    # 6 candidates planned in shards of 2; the corrupt one is dropped from its shard when decoded
    assert sorted(s["num_samples"] for s in train["shards"]) == [1, 2, 2]
    assert manifest["image"] == {"height": None, "width": None, "channels": 3}
    assert [s["file"] for s in manifest["skipped"]] == ["cat/d_corrupt.png"]
    assert manifest["skipped"][0]["error"]
    got = {}
    for url in shard_urls(str(out), manifest, "train"):
        for sample in read_shard(open(url, "rb").read()):
            pixels, label, meta = decode(sample)
            got[meta["file"]] = (pixels, label)
    assert sorted(got) == ["cat/a_rgb.png", "cat/b_grey.png", "cat/c_palette.png", "dog/e_rgba.png", "dog/f.jpg"]
    assert (got["cat/a_rgb.png"][0] == np.arange(60, dtype=np.uint8).reshape(4, 5, 3)).all()
    assert (got["cat/b_grey.png"][0] == 77).all() and got["cat/b_grey.png"][0].shape == (6, 6, 3)
    assert got["cat/c_palette.png"][0].shape == (4, 5, 3)
    assert (got["dog/e_rgba.png"][0] == 200).all() and got["dog/e_rgba.png"][0].shape == (3, 3, 3)
    assert got["dog/f.jpg"][0].shape == (7, 7, 3)
    assert {f: label for f, (_, label) in got.items()} == {
        "cat/a_rgb.png": 0,
        "cat/b_grey.png": 0,
        "cat/c_palette.png": 0,
        "dog/e_rgba.png": 1,
        "dog/f.jpg": 1,
    }
    assert verify(str(out)) == [] and leftovers(out) == []


def test_imagefolder_with_train_and_val(tmp_path):
    make_folder(tmp_path / "pets", "train")
    make_folder(tmp_path / "pets", "val")
    manifest = prepare(f"imagefolder:{tmp_path / 'pets'}", str(tmp_path / "out"))
    assert {k: v["num_samples"] for k, v in manifest["splits"].items()} == {"train": 5, "val": 5}
    assert sorted(s["file"] for s in manifest["skipped"]) == ["train/cat/d_corrupt.png", "val/cat/d_corrupt.png"]
    val = read_shard(open(shard_urls(str(tmp_path / "out"), manifest, "val")[0], "rb").read())
    assert all(s["__key__"].startswith("val_") for s in val)
    assert verify(str(tmp_path / "out")) == []


@pytest.mark.parametrize(
    "source, words",
    [
        ("foo", ["unknown dataset 'foo'", "builtin:digits", "imagefolder:PATH"]),
        ("builtin:cifar", ["unknown dataset 'builtin:cifar'"]),
        ("imagefolder", ["needs a path", "imagefolder:PATH"]),
        ("imagefolder:", ["needs a path"]),
    ],
)
def test_bad_source_names(tmp_path, source, words):
    with pytest.raises(HardnegError) as e:
        prepare(source, str(tmp_path / "out"))
    assert all(w in str(e.value) for w in words), str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_bad_imagefolder_paths(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(HardnegError, match="nope"):
        prepare(f"imagefolder:{missing}", str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(HardnegError, match="empty"):
        prepare(f"imagefolder:{tmp_path / 'empty'}", str(tmp_path / "out"))
    (tmp_path / "broken" / "cat").mkdir(parents=True)
    (tmp_path / "broken" / "cat" / "x.png").write_bytes(b"junk")
    with pytest.raises(HardnegError, match="no readable images"):
        prepare(f"imagefolder:{tmp_path / 'broken'}", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists(), "a failed prepare leaves no OUT behind"


def test_unwritable_out(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, afile / "sub", "/proc/hardneg-x"):
        with pytest.raises(HardnegError, match="cannot write to OUT") as e:
            prepare("builtin:digits", str(out))
        assert str(out) in str(e.value) and "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["afile"] and afile.read_text() == "x"
    with pytest.raises(HardnegError, match="cannot use OUT"):
        prepare("builtin:digits", "nosuchprotocol://x/y")


@pytest.mark.parametrize(
    "kw", [{"shard_size": 0}, {"shard_size": 2.5}, {"seed": -1}, {"test_size": 5}, {"test_size": 5000}]
)
def test_bad_numbers(tmp_path, kw):
    name = next(iter(kw))
    with pytest.raises(HardnegError, match=name):
        prepare("builtin:digits", str(tmp_path / "out"), **kw)
    assert not (tmp_path / "out").exists()


def test_failure_midway_leaves_no_temp_and_no_manifest(digits_out, tmp_path, monkeypatch):
    out, _ = digits_out
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)  # a previous complete run: its manifest must not survive a failed rerun
    os.remove(copy / "train-000001.tar")  # so this shard is really written, and its rename fails

    def broken_mv(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(LocalFileSystem, "mv", broken_mv)
    with pytest.raises(HardnegError, match="disk full") as e:  # one line, not the OSError's traceback
        prepare("builtin:digits", str(copy), shard_size=400)
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    assert not (copy / MANIFEST_NAME).exists()
    assert leftovers(copy) == [] and not (copy / "train-000001.tar").exists()
    with pytest.raises(HardnegError, match="no manifest"):
        verify(str(copy))


def test_read_manifest_errors(tmp_path, digits_out):
    with pytest.raises(HardnegError, match="no manifest"):
        read_manifest(str(tmp_path))
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(HardnegError, match="not valid JSON"):
        read_manifest(str(tmp_path))
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"version": 99, "splits": {}}))
    with pytest.raises(HardnegError, match="version 99"):
        read_manifest(str(tmp_path))
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"version": 1, "splits": {"train": {"shards": [{}]}}}))
    with pytest.raises(HardnegError, match="invalid manifest"):
        read_manifest(str(tmp_path))
    out, manifest = digits_out
    with pytest.raises(HardnegError, match="unknown split 'val'; available: train, test"):
        shard_urls(out, manifest, "val")


def test_plan_is_pure_and_complete():
    sizes = {"train": 1000, "test": 7, "empty": 0}
    a = plan_shards(sizes, 128, seed=3)
    assert a == plan_shards(dict(sizes), 128, seed=3)
    assert a != plan_shards(sizes, 128, seed=4)
    for split, n in sizes.items():
        specs = [s for s in a if s.split == split]
        assert [s.index for s in specs] == list(range(len(specs)))
        assert [len(s.records) for s in specs] == [128] * (n // 128) + ([n % 128] if n % 128 else [])
        flat = [i for s in specs for i in s.records]
        assert sorted(flat) == list(range(n))
    assert [i for s in a if s.split == "train" for i in s.records] != list(range(1000))
    # A split's plan does not depend on the others.
    assert [s for s in plan_shards({"test": 7}, 128, seed=3)] == [s for s in a if s.split == "test"]
    with pytest.raises(HardnegError, match="shard_size"):
        plan_shards(sizes, 0, seed=0)
