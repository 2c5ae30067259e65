"""Readers of raw datasets -> records per split, in a deterministic order; SOURCES is their one table."""

from __future__ import annotations

import io
import posixpath
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import fsspec
import numpy as np
from PIL import Image

from data_prep.errors import HardnegError

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
    data: Optional[bytes] = None  # the original encoded bytes when they are already an RGB JPEG
    extra: Optional[dict] = None  # more per-sample metadata for the json part (e.g. CIFAR-100's coarse label)


@dataclass
class Dataset:
    """What a reader returns: records per split, class names (label i = classes[i]), skipped files."""

    source: str
    splits: dict[str, list[Record]]
    classes: list[str]
    skipped: list[dict] = field(default_factory=list)


def _decode_rgb(data: bytes) -> np.ndarray:
    """Decode image bytes to an (H, W, 3) uint8 array; grey, palette and RGBA become RGB."""
    return decode_image(data)[0]


def decode_image(data: bytes) -> tuple[np.ndarray, Optional[bytes]]:
    """(RGB pixels (H, W, 3) uint8, the bytes themselves if they are already an RGB JPEG else None)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        passthrough = data if img.format == "JPEG" and img.mode == "RGB" else None
        if img.mode in ("P", "PA") and "transparency" in img.info:
            img = img.convert("RGBA")
        pixels = np.asarray(img.convert("RGB"), dtype=np.uint8).copy()  # RGBA: alpha dropped
    if pixels.ndim != 3 or pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise ValueError(f"decoded to shape {pixels.shape}")
    return pixels, passthrough


class SkipImage(Exception):
    """An input image that cannot be used: counted and listed in the manifest (or fatal with --strict)."""

    def __init__(self, file: str, error: str):
        super().__init__(f"{file}: {error}")
        self.file, self.error = file, error


_OBJECT_REPR = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")


def skip_entry(split: str, index: int, file: Optional[str], error: str) -> dict:
    """How a skipped input is listed in the manifest: the error's first line, without object addresses
    (PIL names the ``<_io.BytesIO object at 0x...>`` it read), so a rerun lists it in the same bytes."""
    text = _OBJECT_REPR.sub(r"<\1>", error.splitlines()[0]) if error else ""
    return {"split": split, "index": int(index), "file": file, "error": text}


def decode_record(data: bytes, split: str, index: int, label: int, file: str, spec: str) -> Record:
    """A Record from encoded image bytes; SkipImage if they do not decode."""
    try:
        pixels, passthrough = decode_image(data)
    except Exception as e:  # noqa: BLE001 -- PIL raises many types for broken files
        raise SkipImage(file, f"{type(e).__name__}: {e}".splitlines()[0]) from None
    return Record(split, index, label, pixels, file, spec, passthrough)


class Source:
    """A dataset known up front by its split sizes and classes; records are decoded on demand.

    Sources are sent to worker processes and Ray tasks, so they stay small when pickled: heavy state
    (arrays, open archives) is loaded lazily in each process. ``record(split, i)`` raises SkipImage for
    an input that cannot be used; positions are 0..sizes[split]-1 in the source's own order.
    """

    spec: str = ""
    classes: list = []
    sizes: dict = {}
    info: dict = {}  # extra metadata for the manifest (e.g. CIFAR-100's coarse labels)
    skipped: list = []  # inputs refused while listing (e.g. links out of PATH)
    decodes_files: bool = False  # whether records can fail to decode (else SkipImage never happens)

    def signature(self) -> dict:
        """What identifies this source's content (for resuming): cheap, no full read."""
        raise NotImplementedError

    def record(self, split: str, index: int) -> Record:
        raise NotImplementedError

    def load(self, split: str, positions) -> Iterator:
        """Records (or skip entries, dicts) of ``positions`` of ``split``, in that order."""
        for i in positions:
            i = int(i)  # plans are numpy arrays; records and manifests hold Python ints
            try:
                yield self.record(split, i)
            except SkipImage as e:
                yield skip_entry(split, i, e.file, e.error)

    def materialize(self) -> Dataset:
        """Every record in memory: for small datasets and tests."""
        splits, skipped = {}, list(self.skipped)
        for split, n in self.sizes.items():
            splits[split] = []
            for item in self.load(split, range(n)):
                (skipped if isinstance(item, dict) else splits[split]).append(item)
        return Dataset(self.spec, splits, list(self.classes), skipped)


class DigitsSource(Source):
    """scikit-learn's 1,797 8x8 handwritten digits; stratified held-out test split (random_state=0)."""

    def __init__(self, path: Optional[str], spec: str, test_size: int):
        self.spec, self.test_size = spec, test_size
        self._data = None
        labels, _, split_idx = self._load()
        self.classes = [str(c) for c in range(len(np.unique(labels)))]
        self.sizes = {name: len(idx) for name, idx in split_idx.items()}

    def __getstate__(self):
        return {
            "spec": self.spec,
            "test_size": self.test_size,
            "classes": self.classes,
            "sizes": self.sizes,
            "_data": None,
        }

    def _load(self):
        if self._data is None:
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split

            digits = load_digits()
            labels = digits.target.astype(np.int64)
            n, n_classes, test_size = len(labels), len(np.unique(labels)), self.test_size
            if (
                not isinstance(test_size, int)
                or isinstance(test_size, bool)
                or not n_classes <= test_size <= n - n_classes
            ):
                raise HardnegError(
                    f"test_size={test_size!r} for {self.spec}; expected an integer in {n_classes}..{n - n_classes}"
                )
            train_idx, test_idx = train_test_split(np.arange(n), test_size=test_size, random_state=0, stratify=labels)
            grey = np.rint(digits.images * 255.0 / 16.0).astype(np.uint8)  # (n, 8, 8)
            rgb = np.repeat(grey[..., None], 3, axis=-1)  # (n, 8, 8, 3)
            self._data = (labels, rgb, {"train": sorted(train_idx.tolist()), "test": sorted(test_idx.tolist())})
        return self._data

    def signature(self) -> dict:
        return {"builtin": "digits", "test_size": self.test_size}

    def record(self, split: str, index: int) -> Record:
        labels, rgb, split_idx = self._load()
        i = split_idx[split][index]
        return Record(split, int(i), int(labels[i]), rgb[i], None, self.spec)


def _subdirs(fs, path: str) -> list[str]:
    """Sorted names of the visible sub-directories of ``path``."""
    names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False) if fs.isdir(p)]
    return sorted(n for n in names if not n.startswith("."))


def is_image_name(name: str) -> bool:
    """A visible file with an image extension (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not any(p.startswith(".") for p in name.split("/"))


def imagefolder_members(rel: str, prefixes: dict[str, str]) -> list[tuple[str, str]]:
    """(split, class) of a file ``rel`` of an imagefolder whose splits live under ``prefixes`` ({split: "train/"})."""
    found = []
    for split, prefix in prefixes.items():
        parts = rel[len(prefix) :].split("/") if rel.startswith(prefix) else []
        if len(parts) >= 2 and not parts[0].startswith(".") and is_image_name(rel[len(prefix) :]):
            found.append((split, parts[0]))
    return found


class ImageFolderSource(Source):
    """One sub-folder per class, optionally inside ``train/`` and ``val/``; files decoded on demand.

    The file listing lives on disk (data_prep/listing.py), so memory does not grow with the number of files."""

    decodes_files = True

    def __init__(self, path: Optional[str], spec: str, test_size: int = 0):
        from functools import partial

        from data_prep.listing import FolderListing

        self.spec, self.url = spec, path
        try:
            fs, root = fsspec.core.url_to_fs(path)
            is_dir = fs.isdir(root)
        except Exception as e:  # noqa: BLE001 -- unknown protocol, missing driver, permission...
            raise HardnegError(f"cannot read imagefolder path '{path}': {type(e).__name__}: {e}") from None
        if not is_dir:
            raise HardnegError(f"imagefolder path '{path}' does not exist or is not a directory")
        top = _subdirs(fs, root)
        split_names = [s for s in SPLIT_DIRS if s in top] if "train" in top else []
        prefixes = {s: s + "/" for s in split_names} or {"train": ""}
        # each split's files sorted by (class, file): the skeleton's order, stable across runs and filesystems
        self.listing = FolderListing(path, partial(imagefolder_members, prefixes=prefixes), list(prefixes))
        self.classes = list(self.listing.classes)
        if not self.classes:
            raise HardnegError(f"imagefolder path '{path}' has no class sub-folders")
        self.sizes = dict(self.listing.sizes)
        self.skipped = [skip_entry("", -1, rel, "link points outside PATH") for rel in self.listing.outside]
        if not any(self.sizes.values()):
            raise HardnegError(f"imagefolder path '{path}' has no readable images (no image files)")

    def signature(self) -> dict:
        # sha256 of repr(sorted({name: size}.items())) over the files in PATH, streamed while listing
        return {"url": self.url, "files": self.listing.count, "listing": self.listing.digest}

    def record(self, split: str, index: int) -> Record:
        label, rel = self.listing.entry(split, int(index))
        try:
            data = self.listing.read(rel)
        except Exception as e:  # noqa: BLE001 -- a file that cannot be read is one bad input, skipped and counted, not a crash
            raise SkipImage(rel, f"unreadable: {type(e).__name__}: {e}") from None
        return decode_record(data, split, int(index), label, rel, self.spec)


def _opener(module: str, cls: str) -> Callable[[Optional[str], str, int], Source]:
    """Import a source class on first use (keeps `import data_prep.sources` light)."""

    def open_(path, spec, test_size):
        import importlib

        return getattr(importlib.import_module(module), cls)(path, spec, test_size)

    return open_


# name -> opener of a Source; a name ending in ":PATH" takes a path after the colon.
SOURCES: dict[str, Callable[[Optional[str], str, int], Source]] = {
    "builtin:digits": DigitsSource,
    "imagefolder:PATH": ImageFolderSource,
    "cifar10:PATH": _opener("data_prep.cifar", "Cifar10Source"),
    "cifar100:PATH": _opener("data_prep.cifar", "Cifar100Source"),
    "stl10:PATH": _opener("data_prep.stl10", "Stl10Source"),
    "tinyimagenet:PATH": _opener("data_prep.tinyimagenet", "TinyImageNetSource"),
    "parquet:PATH": _opener("data_prep.parquet", "ParquetSource"),
    "wds:PATH": _opener("data_prep.wds_source", "WdsSource"),
}


def _match(spec: str) -> tuple[Callable[[Optional[str], str, int], Source], Optional[str]]:
    """(opener, path or None) for a source spec; HardnegError if unknown or missing its path."""
    expected = ", ".join(SOURCES)
    if not isinstance(spec, str) or not spec:
        raise HardnegError(f"empty dataset name; expected one of: {expected}")
    for name, entry in SOURCES.items():
        if name.endswith(":PATH"):
            prefix = name[: -len("PATH")]
            if spec == prefix[:-1] or spec.startswith(prefix):
                arg = spec[len(prefix) :]
                if not arg:
                    raise HardnegError(f"dataset '{spec}' needs a path: {name}")
                return entry, arg
        elif spec == name:
            return entry, None
    raise HardnegError(f"unknown dataset '{spec}'; expected one of: {expected}")


def check_spec(spec: str) -> None:
    """HardnegError unless ``spec`` names a source (with its path where it takes one); opens nothing."""
    _match(spec)


def open_source(spec: str, *, test_size: int = 300) -> Source:
    """The Source of a spec (``builtin:digits``, ``cifar10:/data/cifar-10-python.tar.gz``, ...)."""
    opener, arg = _match(spec)
    return opener(arg, spec, test_size)
