"""Small datasets in the official on-disk formats (random pixels): for tests and the prep benchmark.

No download is possible here, so these reproduce the layouts byte for byte where it matters:
CIFAR's pickled batches (protocol 2, bytes keys, uint8 (n, 3072) rows, channel-major), STL-10's
column-major binary records, Tiny ImageNet's zip with ``val/val_annotations.txt``.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile

import numpy as np
from PIL import Image


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def cifar_images(n: int, rng: np.random.Generator, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows (n, 3072) uint8 channel-major, labels (n,)) with a little class structure in the colour."""
    labels = rng.integers(0, classes, n)
    base = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    tint = (labels * 255 // max(classes - 1, 1)).astype(np.uint8)
    base[:, 0, :8, :8] = tint[:, None, None]
    return base.reshape(n, 3072), labels


def write_cifar10(path: str, n_train: int = 50, n_test: int = 10, seed: int = 0, folder: bool = False) -> str:
    """A CIFAR-10 "python version" archive (``cifar-10-python.tar.gz`` layout) or extracted folder."""
    rng = np.random.default_rng(seed)
    files = {
        "batches.meta": pickle.dumps(
            {
                b"num_cases_per_batch": max(n_train // 5, 1),
                b"num_vis": 3072,
                b"label_names": [f"class{i}".encode() for i in range(10)],
            },
            protocol=2,
        )
    }
    per = [n_train // 5 + (1 if i < n_train % 5 else 0) for i in range(5)]
    for name, n in [(f"data_batch_{i + 1}", per[i]) for i in range(5)] + [("test_batch", n_test)]:
        rows, labels = cifar_images(n, rng, 10)
        files[name] = pickle.dumps(
            {
                b"batch_label": f"batch {name}".encode(),
                b"labels": labels.tolist(),
                b"data": rows,
                b"filenames": [f"img_{name}_{i}.png".encode() for i in range(n)],
            },
            protocol=2,
        )
    return _write_tree(path, "cifar-10-batches-py", files, folder)


def write_cifar100(path: str, n_train: int = 50, n_test: int = 10, seed: int = 0, folder: bool = False) -> str:
    """A CIFAR-100 "python version" archive: ``train``, ``test``, ``meta`` with fine and coarse labels."""
    rng = np.random.default_rng(seed)
    fine_to_coarse = np.arange(100) // 5
    files = {
        "meta": pickle.dumps(
            {
                b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
            },
            protocol=2,
        )
    }
    for name, n in (("train", n_train), ("test", n_test)):
        rows, fine = cifar_images(n, rng, 100)
        files[name] = pickle.dumps(
            {
                b"batch_label": name.encode(),
                b"fine_labels": fine.tolist(),
                b"coarse_labels": fine_to_coarse[fine].tolist(),
                b"data": rows,
                b"filenames": [f"{name}_{i}.png".encode() for i in range(n)],
            },
            protocol=2,
        )
    return _write_tree(path, "cifar-100-python", files, folder)


def write_stl10(
    path: str, n_train: int = 20, n_test: int = 10, n_unlabeled: int = 15, seed: int = 0, folder: bool = False
) -> str:
    """An STL-10 binary archive (``stl10_binary.tar.gz`` layout): column-major 96x96 records, labels 1..10."""
    rng = np.random.default_rng(seed)
    files = {"class_names.txt": "".join(f"stlclass{i}\n" for i in range(10)).encode(), "fold_indices.txt": b"0 1 2\n"}
    for split, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled)):
        images = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
        files[f"{split}_X.bin"] = np.ascontiguousarray(images.transpose(0, 3, 2, 1)).tobytes()
        if split != "unlabeled":
            files[f"{split}_y.bin"] = rng.integers(1, 11, n).astype(np.uint8).tobytes()
    return _write_tree(path, "stl10_binary", files, folder)


def _jpeg(rng: np.random.Generator, size: int = 64, mode: str = "RGB") -> bytes:
    img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    img.convert(mode).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_tinyimagenet(
    path: str, classes: int = 3, per_class: int = 4, n_val: int = 6, seed: int = 0, folder: bool = False
) -> str:
    """A Tiny ImageNet zip (``tiny-imagenet-200.zip`` layout); one greyscale JPEG among the training images."""
    rng = np.random.default_rng(seed)
    wnids = [f"n{1000 + i:08d}" for i in range(classes)]
    files = {
        "wnids.txt": "".join(w + "\n" for w in reversed(wnids)).encode(),
        "words.txt": "".join(f"{w}\tthing {i}\n" for i, w in enumerate(wnids)).encode(),
    }
    for c, w in enumerate(wnids):
        for i in range(per_class):
            files[f"train/{w}/images/{w}_{i}.JPEG"] = _jpeg(rng, mode="L" if (c, i) == (0, 0) else "RGB")
        files[f"train/{w}/{w}_boxes.txt"] = b""
    lines = []
    for i in range(n_val):
        files[f"val/images/val_{i}.JPEG"] = _jpeg(rng)
        lines.append(f"val_{i}.JPEG\t{wnids[i % classes]}\t0\t0\t63\t63\n")
    files["val/val_annotations.txt"] = "".join(lines).encode()
    files["test/images/test_0.JPEG"] = _jpeg(rng)
    root = "tiny-imagenet-200"
    if folder:
        return _write_tree(path, root, files, True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in sorted(files.items()):
            info = zipfile.ZipInfo(f"{root}/{name}", date_time=(2020, 1, 1, 0, 0, 0))
            zf.writestr(info, data)
    return path


def _write_tree(path: str, root: str, files: dict, folder: bool) -> str:
    """Write ``files`` under ``root/`` as a folder at ``path`` or a .tar.gz at ``path``."""
    if folder:
        for name, data in files.items():
            target = os.path.join(path, root, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(data)
        return path
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(root)
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
        for name, data in sorted(files.items()):
            _add(tar, f"{root}/{name}", data)
    return path


def write_jpeg_folder(
    path: str, n: int, start: int = 0, imagenet: bool = False, seed: int = 0, classes: int = 10
) -> str:
    """An imagefolder of JPEGs ``c{label}/img{i}.jpg`` for i in [start, n): 32x32, or ImageNet-like sizes
    (300-500 x 250-450 px, smooth colour fields plus noise); each image a function of (seed, i) only, so a
    folder grows from n1 to n2 images by writing the new ones."""
    for i in range(start, n):
        rng = np.random.default_rng([seed, i])
        label = i % classes
        if imagenet:
            w, h = int(rng.integers(300, 501)), int(rng.integers(250, 451))
            field = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
            noise = rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
            pixels = np.clip(np.asarray(field, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        else:
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        folder = os.path.join(path, f"c{label:02d}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(pixels).save(os.path.join(folder, f"img{i:08d}.jpg"), format="JPEG", quality=90)
    return path
