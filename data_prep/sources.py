"""Readers of raw datasets -> records per split, in a deterministic order."""
from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass, field
from typing import Callable, Optional

import fsspec
import numpy as np
from PIL import Image

from pipeline.errors import HardnegError

# Extensions the imagefolder reader tries to decode (case-insensitive); other files are ignored.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SPLIT_DIRS = ("train", "val")


@dataclass(frozen=True, eq=False)
class Record:
    """One image of a dataset: where it comes from, its label, its RGB pixels (H, W, 3) uint8."""

    split: str
    source_index: int
    label: int
    image: np.ndarray
    file: Optional[str] = None
    source: str = ""


@dataclass
class Dataset:
    """What a reader returns: records per split, class names (label i = classes[i]), skipped files."""

    source: str
    splits: dict[str, list[Record]]
    classes: list[str]
    skipped: list[dict] = field(default_factory=list)


Reader = Callable[[Optional[str], str, int], Dataset]  # (path or None, spec, test_size) -> Dataset


def read_digits(path: Optional[str], spec: str, test_size: int) -> Dataset:
    """scikit-learn's 1,797 8x8 handwritten digits; stratified held-out test split (random_state=0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    n = len(labels)
    n_classes = len(np.unique(labels))
    if not isinstance(test_size, int) or isinstance(test_size, bool) or not n_classes <= test_size <= n - n_classes:
        raise HardnegError(f"test_size={test_size!r} for {spec}; expected an integer in {n_classes}..{n - n_classes}")
    train_idx, test_idx = train_test_split(
        np.arange(n), test_size=test_size, random_state=0, stratify=labels
    )
    grey = np.rint(digits.images * 255.0 / 16.0).astype(np.uint8)  # (n, 8, 8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)  # (n, 8, 8, 3)
    splits = {
        name: [Record(name, int(i), int(labels[i]), rgb[i], None, spec) for i in sorted(idx)]
        for name, idx in (("train", train_idx), ("test", test_idx))
    }
    return Dataset(spec, splits, [str(c) for c in range(n_classes)])


def _decode_rgb(data: bytes) -> np.ndarray:
    """Decode image bytes to an (H, W, 3) uint8 array; grey, palette and RGBA become RGB."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.mode in ("P", "PA") and "transparency" in img.info:
            img = img.convert("RGBA")
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def _subdirs(fs, path: str) -> list[str]:
    """Sorted names of the visible sub-directories of ``path``."""
    names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False) if fs.isdir(p)]
    return sorted(n for n in names if not n.startswith("."))


def _image_files(fs, path: str) -> list[str]:
    """Sorted paths of the image files anywhere under ``path`` (hidden ones left out)."""
    found = fs.find(path)
    keep = []
    for p in found:
        rel = posixpath.relpath(p, path)
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        if p.lower().endswith(IMAGE_EXTENSIONS):
            keep.append(p)
    return sorted(keep)


def read_imagefolder(path: Optional[str], spec: str, test_size: int) -> Dataset:
    """One sub-folder per class, optionally inside ``train/`` and ``val/``; undecodable files skipped."""
    try:
        fs, root = fsspec.core.url_to_fs(path)
        is_dir = fs.isdir(root)
    except Exception as e:  # unknown protocol, missing driver, permission...
        raise HardnegError(f"cannot read imagefolder path '{path}': {e}") from None
    if not is_dir:
        raise HardnegError(f"imagefolder path '{path}' does not exist or is not a directory")
    top = _subdirs(fs, root)
    split_names = [s for s in SPLIT_DIRS if s in top] if "train" in top else []
    split_roots = {s: posixpath.join(root, s) for s in split_names} or {"train": root}
    class_dirs = {s: _subdirs(fs, r) for s, r in split_roots.items()}
    classes = sorted(set().union(*class_dirs.values()))
    if not classes:
        raise HardnegError(f"imagefolder path '{path}' has no class sub-folders")
    label_of = {c: i for i, c in enumerate(classes)}
    splits: dict[str, list[Record]] = {}
    skipped: list[dict] = []
    for split, split_root in split_roots.items():
        files = [(c, f) for c in class_dirs[split] for f in _image_files(fs, posixpath.join(split_root, c))]
        records = []
        for index, (cls, file) in enumerate(files):
            rel = posixpath.relpath(file, root)
            try:
                image = _decode_rgb(fs.cat_file(file))
            except Exception as e:  # PIL raises many types for broken files
                skipped.append({"file": rel, "error": f"{type(e).__name__}: {e}".splitlines()[0]})
                continue
            records.append(Record(split, index, label_of[cls], image, rel, spec))
        splits[split] = records
    if not any(splits.values()):
        raise HardnegError(f"imagefolder path '{path}' has no readable images ({len(skipped)} skipped)")
    return Dataset(spec, splits, classes, skipped)


# name -> reader; a name ending in ":PATH" takes a path after the colon.
READERS: dict[str, Reader] = {
    "builtin:digits": read_digits,
    "imagefolder:PATH": read_imagefolder,
}


def resolve(spec: str) -> tuple[Reader, Optional[str]]:
    """Find the reader for a source spec and split off its path; HardnegError if unknown."""
    expected = ", ".join(READERS)
    if not isinstance(spec, str) or not spec:
        raise HardnegError(f"empty dataset name; expected one of: {expected}")
    for name, reader in READERS.items():
        if name.endswith(":PATH"):
            prefix = name[: -len("PATH")]
            if spec == prefix[:-1] or spec.startswith(prefix):
                arg = spec[len(prefix):]
                if not arg:
                    raise HardnegError(f"dataset '{spec}' needs a path: {name}")
                return reader, arg
        elif spec == name:
            return reader, None
    raise HardnegError(f"unknown dataset '{spec}'; expected one of: {expected}")


def read_source(spec: str, *, test_size: int = 300) -> Dataset:
    """Read a dataset given by its spec (e.g. ``builtin:digits``, ``imagefolder:/data/pets``)."""
    reader, arg = resolve(spec)
    return reader(arg, spec, test_size)
