"""FFCV output (one .beton per split) and the FFCV training loader."""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tarfile
import uuid

import fsspec
import numpy as np
import pytest
import torch

from data_prep import synthetic
from data_prep.manifest import verify
from data_prep.prep import prepare
from pipeline import augment, data, faults
from pipeline.config import AugmentConfig
from pipeline.errors import HardnegError

ffcv = pytest.importorskip("ffcv", reason="FFCV is not installed here (make setup builds it)")


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """CIFAR-10 (300 train, 60 test) prepared as shards and FFCV files: (out, manifest, source path)."""
    root = tmp_path_factory.mktemp("ffcv")
    src = synthetic.write_cifar10(str(root / "c10.tar.gz"), n_train=300, n_test=60)
    out = root / "out"
    return out, prepare(f"cifar10:{src}", str(out), shard_size=40, format="both", workers=2), src


def beton_rows(path) -> tuple[np.ndarray, list[np.ndarray]]:
    """(labels, images) of a raw-mode .beton, read from its metadata table and data pointers."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    assert reader.field_names == ["image", "label"]
    image, label = reader.metadata["f0"], reader.metadata["f1"]  # FFCV names metadata columns by position
    raw = open(path, "rb").read()
    images = [
        np.frombuffer(raw, np.uint8, int(m["height"]) * int(m["width"]) * 3, int(m["data_ptr"])).reshape(
            int(m["height"]), int(m["width"]), 3
        )
        for m in image
    ]
    assert (image["mode"] == 1).all(), "32x32 images are stored raw (lossless)"
    return np.asarray(label).reshape(-1), images


def shard_rows(out, manifest, split) -> tuple[list[int], list[np.ndarray]]:
    from PIL import Image

    labels, images = [], []
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(out / shard["path"]) as tar:
            for m in tar:
                if m.name.endswith(".cls"):
                    labels.append(int(tar.extractfile(m).read()))
                elif m.name.endswith(".png"):
                    images.append(np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read()))))
    return labels, images


def test_beton_holds_the_split_in_planned_order(both):
    out, manifest, _ = both
    for split, n in (("train", 300), ("test", 60)):
        entry = manifest["splits"][split]["ffcv"]
        assert (
            entry["path"] == f"{split}.beton" and entry["num_samples"] == n == manifest["splits"][split]["num_samples"]
        )
        assert hashlib.sha256((out / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]
        labels, images = beton_rows(out / entry["path"])
        wds_labels, wds_images = shard_rows(out, manifest, split)
        assert labels.tolist() == wds_labels
        assert all((a == b).all() for a, b in zip(images, wds_images, strict=True))
    assert manifest["prep"]["format"] == "both" and verify(str(out)) == []


def test_beton_bytes_are_deterministic_and_reruns_keep_them(both, tmp_path):
    out, manifest, src = both
    again = prepare(f"cifar10:{src}", str(tmp_path / "o"), shard_size=40, format="ffcv")
    assert again["splits"]["train"]["ffcv"]["sha256"] == manifest["splits"]["train"]["ffcv"]["sha256"]
    assert again["splits"]["train"]["shards"] == [] and again["splits"]["train"]["num_samples"] == 300
    assert verify(str(tmp_path / "o")) == []
    st = os.stat(tmp_path / "o" / "train.beton")
    prepare(f"cifar10:{src}", str(tmp_path / "o"), shard_size=40, format="ffcv")
    now = os.stat(tmp_path / "o" / "train.beton")
    assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)


def test_verify_checks_beton_files(both, tmp_path):
    out, manifest, src = both
    copy = tmp_path / "copy"
    prepare(f"cifar10:{src}", str(copy), shard_size=40, format="ffcv")
    with open(copy / "train.beton", "r+b") as f:
        f.seek(5000)
        f.write(b"\xff\xfe")
    os.remove(copy / "test.beton")
    problems = verify(str(copy))
    assert any("train.beton: sha256" in p for p in problems) and any("test.beton: missing" in p for p in problems)


def test_ffcv_unavailable_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    import data_prep.ffcv as writer

    monkeypatch.setattr(writer, "unavailable", lambda: "ImportError: No module named 'ffcv'")
    with pytest.raises(HardnegError, match=r"FFCV is unavailable \(ImportError") as e:
        prepare("builtin:digits", str(tmp_path / "out"), format="both")
    assert "\n" not in str(e.value) and "--format wds" in str(e.value)
    assert not (tmp_path / "out").exists()
    monkeypatch.setitem(sys.modules, "ffcv.loader", None)
    with pytest.raises(HardnegError, match="FFCV is unavailable"):
        next(data.ffcv_train_batches(str(tmp_path), "train", AugmentConfig(), 8, rank=0, seed=0))


def test_rank_order_is_distributed_sampler_with_equal_shares():
    indices = np.arange(10, 33, dtype=np.uint64)  # 23 samples over 4 ranks: padded to 24, 6 each
    for epoch in (0, 1):
        parts = [data.rank_order(indices, 5, epoch, r, 4) for r in range(4)]
        assert [len(p) for p in parts] == [6] * 4
        flat = np.concatenate(parts)
        assert set(flat.tolist()) == set(indices.tolist()) and len(flat) == 24
        sampler = torch.utils.data.DistributedSampler(range(23), num_replicas=4, rank=2, shuffle=True, seed=5)
        sampler.set_epoch(epoch)
        assert parts[2].tolist() == indices[list(sampler)].tolist()
    assert data.rank_order(indices, 5, 0, 0, 4).tolist() != data.rank_order(indices, 5, 1, 0, 4).tolist()


def test_colour_steps_match_torchvision():
    """The FFCV path's colour steps are augment.BatchColour's kornia steps: hue as torchvision's adjust_hue,
    nothing but the normalisation when off, three equal channels when greyed."""
    from torchvision.transforms.v2 import functional as F

    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    hue_only = AugmentConfig(jitter_p=1.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.5, grayscale_p=0.0)
    mean, std = torch.tensor(hue_only.mean).view(1, 3, 1, 1), torch.tensor(hue_only.std).view(1, 3, 1, 1)
    colour = augment.BatchColour(hue_only)
    got = colour(x) * std + mean
    shift = colour.steps._params[0].data["hue_factor"]
    assert shift.shape == (6,) and shift.min() < 0 < shift.max()
    want = torch.stack([F.adjust_hue(x[i].float() / 255, float(shift[i])) for i in range(6)])
    assert torch.allclose(got, want, atol=1e-5)
    cfg = AugmentConfig(jitter_p=0.0, grayscale_p=0.0)
    assert torch.allclose(augment.BatchColour(cfg)(x), (x.float() / 255 - mean) / std)
    grey = augment.BatchColour(AugmentConfig(jitter_p=0.0, grayscale_p=1.0))(x)
    assert torch.allclose(grey * std + mean, ((grey * std + mean)[:, :1]).expand_as(grey), atol=1e-6)


def test_ffcv_loader_batches_follow_the_rank_order(both):
    """One Loader (FFCV compiles its pipeline, ~15 s): rank 1 of 2, batches of 16 from 300 samples."""
    out, manifest, _ = both
    labels, _ = beton_rows(out / "train.beton")
    threads = torch.get_num_threads()
    batches = data.ffcv_train_batches(str(out), "train", AugmentConfig(), 16, rank=1, seed=11, world_size=2)
    per_epoch = 150 // 16  # ceil(300 / 2) samples per rank, full batches only
    got = [next(batches) for _ in range(per_epoch + 1)]
    assert torch.get_num_threads() == threads, "FFCV must not change torch's thread count"
    indices = np.arange(300, dtype=np.uint64)
    order = [data.rank_order(indices, 11, e, 1, 2) for e in (0, 1)]
    want = [order[0][k * 16 : (k + 1) * 16] for k in range(per_epoch)] + [order[1][:16]]
    for (v1, v2, y), idx in zip(got, want, strict=True):
        assert v1.shape == v2.shape == (16, 3, 32, 32) and v1.dtype == torch.float32 and y.dtype == torch.int64
        assert y.tolist() == labels[idx.astype(np.int64)].tolist()
        assert not torch.equal(v1, v2), "two independent views"
        assert v1.is_contiguous() and torch.isfinite(v1).all() and -3 < v1.mean() < 3


def test_remote_beton_is_copied_to_the_cache_once(tmp_path):
    out = f"memory://hardneg-ffcv-{uuid.uuid4().hex}/out"
    fs, root = fsspec.core.url_to_fs(out)
    try:
        manifest = prepare("builtin:digits", out, format="ffcv")
        assert verify(out) == []
        first = data._ffcv_file(out, manifest, "test", str(tmp_path / "cache"))
        entry = manifest["splits"]["test"]["ffcv"]
        assert first == str(tmp_path / "cache" / "ffcv" / f"{entry['sha256']}.beton")
        assert hashlib.sha256(open(first, "rb").read()).hexdigest() == entry["sha256"]
        mtime = os.stat(first).st_mtime_ns
        assert data._ffcv_file(out, manifest, "test", str(tmp_path / "cache")) == first
        assert os.stat(first).st_mtime_ns == mtime
        with fs.open(f"{root}/train.beton", "wb") as f:
            f.write(b"tampered")
        with pytest.raises(HardnegError, match="differs from its manifest"):
            data._ffcv_file(out, manifest, "train", str(tmp_path / "cache"))
        assert os.listdir(tmp_path / "cache" / "ffcv") == [os.path.basename(first)]
        with pytest.raises(HardnegError, match="has no FFCV file"):
            data._ffcv_file(out, dict(manifest, splits={"val": {"shards": []}}), "val", None)
    finally:
        fs.rm(root.split("/out")[0], recursive=True)


def test_an_undecodable_jpeg_is_skipped_counted_and_named_once(tmp_path, capfd):
    """A .beton of JPEGs with one corrupt sample: every batch stays full, the sample is counted each time an epoch
    reaches it, named once with the file and its index, and the skip budget names the file."""
    from ffcv.reader import Reader

    out = tmp_path / "out"
    manifest = prepare("builtin:digits", str(out), format="ffcv", image_format="jpg")
    path = out / "train.beton"
    reader = Reader(str(path))
    images, labels = reader.metadata["f0"], np.asarray(reader.metadata["f1"]).reshape(-1)
    assert (images["mode"] == 0).all(), "stored as JPEG"
    bad = 5
    with open(path, "r+b") as f:  # zero the JPEG header after its SOI marker: libjpeg-turbo cannot decode it
        f.seek(int(images[bad]["data_ptr"]) + 2)
        f.write(bytes(20))
    n, b = manifest["splits"]["train"]["num_samples"], 64
    ledger = data.SkipLedger()
    batches = data.ffcv_train_batches(str(out), "train", AugmentConfig(image_size=8), b, rank=0, seed=3, ledger=ledger)
    per_epoch = n // b
    got = [next(batches) for _ in range(2 * per_epoch)]  # two epochs: two orders
    orders = [data.rank_order(np.arange(n, dtype=np.uint64), 3, e, 0, 1).astype(np.int64) for e in (0, 1)]
    want_skips = 0
    for k, (v1, v2, y) in enumerate(got):
        assert v1.shape == v2.shape == (b, 3, 8, 8) and y.shape == (b,) and torch.isfinite(v1).all()
        idx = orders[k // per_epoch][(k % per_epoch) * b : (k % per_epoch + 1) * b]
        good = [i for i in idx if i != bad]
        want_skips += len(idx) - len(good)
        assert y.tolist() == labels[good + good[: b - len(good)]].tolist(), k  # refilled from the good samples
    assert want_skips >= 1, "the corrupt sample was read at least once"
    assert (ledger.skipped, ledger.read) == (want_skips, 2 * per_epoch * b)
    assert ledger.worst() == (str(path), want_skips)
    named = [line for line in capfd.readouterr().err.splitlines() if "skipping a bad sample" in line]
    assert len(named) == 1 and f"{path} (sample {bad}: undecodable JPEG)" in named[0], named
    with pytest.raises(HardnegError, match=r"exceed data\.max_skip_fraction=0\.0001; worst shard .*train\.beton"):
        faults.check_skip_budget(ledger.skipped, ledger.read, 0.0001, ledger.worst(), str(out))
