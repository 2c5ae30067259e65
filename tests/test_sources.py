"""Dataset readers in their official formats (built small by data_prep.synthetic), and hostile inputs."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from data_prep import synthetic
from data_prep.prep import prepare
from data_prep.sources import open_source
from pipeline.errors import HardnegError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HARDNEG_CACHE_DIR", str(tmp_path / "cache"))


def unpickle(data: bytes):
    return pickle.loads(data, encoding="bytes")


def tar_members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def one_line_error(fn, *words):
    with pytest.raises(HardnegError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


@pytest.mark.parametrize("folder", [False, True])
def test_cifar10(tmp_path, folder):
    path = synthetic.write_cifar10(
        str(tmp_path / ("c10" if folder else "c10.tar.gz")), n_train=23, n_test=7, folder=folder
    )
    src = open_source(f"cifar10:{path}")
    assert src.sizes == {"train": 23, "test": 7}
    assert src.classes == [f"class{i}" for i in range(10)]
    ref = synthetic.write_cifar10(str(tmp_path / "ref.tar.gz"), n_train=23, n_test=7)
    members = tar_members(ref)
    rows = np.concatenate([unpickle(members[f"cifar-10-batches-py/data_batch_{i}"])[b"data"] for i in range(1, 6)])
    labels = sum((unpickle(members[f"cifar-10-batches-py/data_batch_{i}"])[b"labels"] for i in range(1, 6)), [])
    for i in (0, 5, 22):  # 23 rows over five batches: 5, 5, 5, 4, 4
        r = src.record("train", i)
        assert r.image.shape == (32, 32, 3) and r.image.dtype == np.uint8
        assert (r.image == rows[i].reshape(3, 32, 32).transpose(1, 2, 0)).all()
        assert r.label == labels[i] and r.source_index == i
    assert src.record("train", 5).file == "cifar-10-batches-py/data_batch_2:0"
    if folder:  # the cifar-10-batches-py folder itself works too
        assert open_source(f"cifar10:{path}/cifar-10-batches-py").sizes == src.sizes


def test_cifar100_keeps_fine_labels_and_coarse_in_metadata(tmp_path):
    path = synthetic.write_cifar100(str(tmp_path / "c100.tar.gz"), n_train=30, n_test=5)
    src = open_source(f"cifar100:{path}")
    assert len(src.classes) == 100 and src.sizes == {"train": 30, "test": 5}
    train = unpickle(tar_members(path)["cifar-100-python/train"])
    for i in range(30):
        r = src.record("train", i)
        assert r.label == train[b"fine_labels"][i] and r.extra == {"coarse": train[b"coarse_labels"][i]}
    assert src.info["coarse_classes"] == [f"coarse{i}" for i in range(20)]
    assert all(c in (-1, f // 5) for f, c in enumerate(src.info["fine_to_coarse"]))
    manifest = prepare(f"cifar100:{path}", str(tmp_path / "out"), shard_size=100)
    assert manifest["info"]["coarse_classes"][0] == "coarse0"
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        metas = [__import__("json").loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    assert all(m["coarse"] == m["label"] // 5 for m in metas) and len(metas) == 30


@pytest.mark.parametrize("folder", [False, True])
def test_stl10_train_test_unlabeled(tmp_path, folder):
    path = synthetic.write_stl10(str(tmp_path / ("stl" if folder else "stl.tar.gz")), folder=folder)
    src = open_source(f"stl10:{path}")
    assert src.sizes == {"train": 20, "test": 10, "unlabeled": 15}
    assert src.classes == [f"stlclass{i}" for i in range(10)]
    files = synthetic.write_stl10(str(tmp_path / "ref"), folder=True)
    raw = np.fromfile(os.path.join(files, "stl10_binary", "train_X.bin"), np.uint8).reshape(-1, 3, 96, 96)
    y = np.fromfile(os.path.join(files, "stl10_binary", "train_y.bin"), np.uint8)
    r = src.record("train", 3)
    assert (r.image == raw[3].transpose(2, 1, 0)).all() and r.label == y[3] - 1
    assert src.record("unlabeled", 14).label == -1
    manifest = prepare(f"stl10:{path}", str(tmp_path / "out"), shard_size=8, workers=2)
    assert {k: v["num_samples"] for k, v in manifest["splits"].items()} == {"train": 20, "test": 10, "unlabeled": 15}
    if not folder:  # the archive's members were decompressed into the cache, under names we chose
        cached = [f for _, _, fs in os.walk(tmp_path / "cache") for f in fs if f != "index.json"]
        assert cached and all(f.endswith(".bin") and len(f) == 28 for f in cached)


@pytest.mark.parametrize("folder", [False, True])
def test_tinyimagenet(tmp_path, folder):
    path = synthetic.write_tinyimagenet(str(tmp_path / ("tiny" if folder else "tiny.zip")), folder=folder)
    src = open_source(f"tinyimagenet:{path}")
    wnids = [f"n{1000 + i:08d}" for i in range(3)]
    assert src.classes == wnids and src.sizes == {"train": 12, "val": 6}
    assert src.info["class_words"] == ["thing 0", "thing 1", "thing 2"]
    first = src.record("train", 0)  # the greyscale JPEG, now RGB
    assert first.image.shape == (64, 64, 3) and first.label == 0 and first.data is None
    assert src.record("train", 1).data is not None  # an RGB JPEG keeps its bytes for --image-format jpg
    for i in range(6):  # val labels come from val_annotations.txt (val_i -> wnids[i % 3])
        r = src.record("val", i)
        assert r.file.endswith(f"val/images/val_{i}.JPEG") and r.label == i % 3


def test_tinyimagenet_corrupt_image_is_skipped_or_fatal_with_strict(tmp_path):
    path = synthetic.write_tinyimagenet(str(tmp_path / "tiny"), folder=True)
    bad = tmp_path / "tiny" / "tiny-imagenet-200" / "train" / "n00001001" / "images" / "n00001001_2.JPEG"
    bad.write_bytes(bad.read_bytes()[:40])
    manifest = prepare(f"tinyimagenet:{path}", str(tmp_path / "out"))
    assert manifest["splits"]["train"]["num_samples"] == 11
    assert [s["file"] for s in manifest["skipped"]] == ["tiny-imagenet-200/train/n00001001/images/n00001001_2.JPEG"]
    one_line_error(
        lambda: prepare(f"tinyimagenet:{path}", str(tmp_path / "out2"), strict=True), "n00001001_2.JPEG", "--strict"
    )


def test_wrong_format_for_the_named_dataset(tmp_path):
    c100 = synthetic.write_cifar100(str(tmp_path / "c100.tar.gz"), n_train=5, n_test=5)
    c10 = synthetic.write_cifar10(str(tmp_path / "c10.tar.gz"), n_train=5, n_test=5)
    tiny = synthetic.write_tinyimagenet(str(tmp_path / "tiny.zip"))
    (tmp_path / "notes.txt").write_text("hello")
    one_line_error(lambda: open_source(f"cifar10:{c100}"), "not the CIFAR-10 python version", "data_batch_1")
    one_line_error(lambda: open_source(f"cifar100:{c10}"), "not the CIFAR-100 python version")
    one_line_error(lambda: open_source(f"stl10:{c10}"), "not the STL-10 binary version", "train_X.bin")
    one_line_error(lambda: open_source(f"tinyimagenet:{c10}"), "not Tiny ImageNet", "got a tar")
    one_line_error(lambda: open_source(f"cifar10:{tiny}"), "not the CIFAR-10 python version", "got a zip")
    one_line_error(
        lambda: open_source(f"cifar10:{tmp_path / 'notes.txt'}"), "neither a folder, a tar archive nor a zip"
    )
    one_line_error(lambda: open_source(f"cifar10:{tmp_path / 'nope.tar.gz'}"), "does not exist")
    one_line_error(lambda: open_source(f"tinyimagenet:{tmp_path}"), "no wnids.txt")


def test_truncated_archives(tmp_path):
    for name, write, spec in (
        ("c10.tar.gz", synthetic.write_cifar10, "cifar10"),
        ("stl.tar.gz", synthetic.write_stl10, "stl10"),
        ("tiny.zip", synthetic.write_tinyimagenet, "tinyimagenet"),
    ):
        path = tmp_path / name
        write(str(path))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        one_line_error(
            lambda spec=spec, path=path: prepare(f"{spec}:{path}", str(tmp_path / f"out-{spec}")),
            "truncated or corrupt",
        )
        assert not (tmp_path / f"out-{spec}").exists()


def _cifar_with(tmp_path, name: str, payload: bytes, extra=()):
    """A CIFAR-10 archive whose member ``name`` is replaced by ``payload`` (plus ``extra`` tar members)."""
    good = synthetic.write_cifar10(str(tmp_path / "good.tar.gz"), n_train=5, n_test=5)
    path = tmp_path / "bad.tar.gz"
    with tarfile.open(good) as src, tarfile.open(path, "w:gz") as dst:
        for m in src:
            data = src.extractfile(m).read() if m.isfile() else None
            if m.name == f"cifar-10-batches-py/{name}":
                data, m.size = payload, len(payload)
            dst.addfile(m, io.BytesIO(data) if data is not None else None)
        for info, data in extra:
            dst.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


class _Evil:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    payloads = [
        pickle.dumps({b"data": _Evil(f"touch {marker}"), b"labels": []}, protocol=2),
        pickle.dumps(_Evil(f"touch {marker}"), protocol=4),
        b"cbuiltins\neval\n(V__import__('os').system('touch " + str(marker).encode() + b"')\ntR.",
    ]
    for payload in payloads:
        path = _cifar_with(tmp_path, "data_batch_3", payload)
        msg = one_line_error(
            lambda path=path: open_source(f"cifar10:{path}"), "refusing to unpickle", "data_batch_3", "nothing was run"
        )
        assert "system" in msg or "eval" in msg
        assert not marker.exists()


def test_archive_members_escaping_the_root_are_refused(tmp_path):
    def member(name, data=b"x", kind=tarfile.REGTYPE, link=""):
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
        return info, data if kind == tarfile.REGTYPE else None

    cases = [
        ([member("../escaped.txt")], "escaping its root: '../escaped.txt'"),
        ([member("/tmp/hardneg-absolute.txt")], "escaping its root: '/tmp/hardneg-absolute.txt'"),
        ([member("cifar-10-batches-py/link", kind=tarfile.SYMTYPE, link="/etc/passwd")], "link escaping"),
        ([member("cifar-10-batches-py/hard", kind=tarfile.LNKTYPE, link="../../outside")], "link escaping"),
    ]
    for extra, words in cases:
        path = _cifar_with(
            tmp_path,
            "data_batch_1",
            tar_members(synthetic.write_cifar10(str(tmp_path / "g.tar.gz"), n_train=5, n_test=5))[
                "cifar-10-batches-py/data_batch_1"
            ],
            extra,
        )
        one_line_error(lambda path=path: prepare(f"cifar10:{path}", str(tmp_path / "out")), words)
        assert not (tmp_path / "escaped.txt").exists() and not os.path.exists("/tmp/hardneg-absolute.txt")
        assert not (tmp_path / "out").exists()
    zpath = tmp_path / "evil.zip"
    synthetic.write_tinyimagenet(str(zpath))
    with zipfile.ZipFile(zpath, "a") as zf:
        zf.writestr("../../evil.JPEG", b"x")
    one_line_error(lambda: open_source(f"tinyimagenet:{zpath}"), "escaping its root: '../../evil.JPEG'")


def test_imagefolder_link_out_of_path_is_skipped(tmp_path):
    outside = tmp_path / "secret.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(outside)
    (tmp_path / "pets" / "cat").mkdir(parents=True)
    Image.new("RGB", (4, 4), (9, 9, 9)).save(tmp_path / "pets" / "cat" / "ok.png")
    os.symlink(outside, tmp_path / "pets" / "cat" / "link.png")
    manifest = prepare(f"imagefolder:{tmp_path / 'pets'}", str(tmp_path / "out"))
    assert manifest["splits"]["train"]["num_samples"] == 1
    assert [(s["file"], s["error"]) for s in manifest["skipped"]] == [("cat/link.png", "link points outside PATH")]
