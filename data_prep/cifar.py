"""CIFAR-10 and CIFAR-100, "python version": the official tar.gz or its extracted folder.

The batches are pickles. They are read with a restricted unpickler that admits only numpy's array
reconstruction and the bytes codec -- anything else (a payload that would call ``os.system``...) is
refused when its name is read, before anything runs.
"""

from __future__ import annotations

import io
import pickle
import posixpath

import numpy as np

from data_prep import archive
from data_prep.errors import HardnegError
from data_prep.sources import Record, Source

_NP_CORE = getattr(np, "_core", None) or np.core
# (module, name) a CIFAR pickle may name -> the object it gets. Nothing else is ever imported.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _NP_CORE.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _NP_CORE.multiarray._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _NP_CORE.numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _NP_CORE.numeric._frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): __import__("codecs").encode,  # how protocol-2 pickles spell bytes
}


# (class name, url) -> arrays, per process: filled by the process that opened the source, inherited by
# forked workers, loaded once by any other process (a spawned worker, a Ray task).
_LOADED: dict = {}


class RefusedPickle(Exception):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise RefusedPickle(f"{module}.{name}") from None


def load_pickle(data: bytes, where: str):
    """Unpickle CIFAR batch bytes, admitting only containers, bytes, numbers and numpy arrays."""
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except RefusedPickle as e:
        raise HardnegError(
            f"refusing to unpickle {where}: it names {e}, which a CIFAR batch never holds; nothing was run"
        ) from None
    except Exception as e:  # noqa: BLE001 -- a damaged pickle raises many types (EOFError, UnpicklingError, ValueError ...)
        raise HardnegError(f"{where} is not a readable CIFAR pickle ({type(e).__name__}: {e})") from None
    return _str_keys(obj)


def _str_keys(obj):
    if isinstance(obj, dict):
        return {(k.decode("latin1") if isinstance(k, bytes) else k): _str_keys(v) for k, v in obj.items()}
    return obj


def _names(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


class _CifarSource(Source):
    """Shared by CIFAR-10 and CIFAR-100: the arrays are held in memory (150 MB), loaded once per process."""

    title = ""
    folder = ""
    batches: dict = {}
    meta_file = ""
    label_key = ""
    names_key = ""
    n_classes = 0

    def __init__(self, path, spec: str, test_size: int = 0):
        self.url, self.spec = path, spec
        fs, root = archive.open_fs(path, "PATH")
        self.kind = archive.kind_of(fs, root, path)
        arrays, meta = self._read()
        _LOADED[(type(self).__name__, self.url)] = arrays
        self.classes = _names(meta[self.names_key])
        if len(self.classes) != self.n_classes:
            raise self._wrong(f"{self.meta_file} names {len(self.classes)} classes, expected {self.n_classes}")
        self.sizes = {split: len(labels) for split, (_, labels, _) in arrays.items()}
        self.info = self._info(meta)

    @property
    def _arrays(self):
        key = (type(self).__name__, self.url)
        if key not in _LOADED:
            _LOADED[key] = self._read()[0]
        return _LOADED[key]

    def _wrong(self, why: str) -> HardnegError:
        return HardnegError(f"'{self.url}' is not the {self.title} python version: {why}")

    def _files(self) -> dict[str, bytes]:
        """Raw bytes of every batch and the meta file, from a tar or a folder."""
        wanted = [f for files in self.batches.values() for f in files] + [self.meta_file]

        def member_of(name: str):
            base, parent = posixpath.basename(name), posixpath.basename(posixpath.dirname(name))
            return base if base in wanted and parent in ("", self.folder) else None

        if self.kind == "tar":
            found = {
                member_of(n): data for n, data in archive.tar_read(self.url, lambda n: member_of(n) is not None).items()
            }
        elif self.kind == "dir":
            tree = archive.FolderTree(self.url)
            found = {member_of(n): tree.read(n) for n in tree.names if member_of(n) is not None}
        else:
            raise self._wrong("expected the .tar.gz archive or its extracted folder, got a zip")
        missing = [f for f in wanted if f not in found]
        if missing:
            raise self._wrong(f"missing {', '.join(missing)} (looked for {self.folder}/...)")
        return found

    def _read(self):
        files = self._files()
        meta = load_pickle(files[self.meta_file], f"{self.url}:{self.meta_file}")
        if not isinstance(meta, dict) or self.names_key not in meta:
            raise self._wrong(f"{self.meta_file} has no '{self.names_key}'")
        arrays = {}
        for split, names in self.batches.items():
            data, labels, extra, origin = [], [], [], []
            for name in names:
                batch = load_pickle(files[name], f"{self.url}:{name}")
                x, y = self._check_batch(batch, name)
                data.append(x)
                labels.append(y)
                extra.append(np.asarray(batch.get("coarse_labels", [-1] * len(y)), dtype=np.int64))
                origin += [(name, row) for row in range(len(y))]
            arrays[split] = (np.concatenate(data), np.concatenate(labels), (np.concatenate(extra), origin))
        return arrays, meta

    def _check_batch(self, batch, name: str):
        if not isinstance(batch, dict) or "data" not in batch or self.label_key not in batch:
            keys = ", ".join(sorted(map(str, batch))) if isinstance(batch, dict) else type(batch).__name__
            raise self._wrong(f"{name} lacks 'data' or '{self.label_key}' (has {keys})")
        x, y = batch["data"], np.asarray(batch[self.label_key])
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
            raise self._wrong(f"{name}: 'data' should be a uint8 array of shape (n, 3072)")
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise self._wrong(f"{name}: {len(y)} labels for {len(x)} images")
        if len(y) and (y.min() < 0 or y.max() >= self.n_classes):
            raise self._wrong(f"{name}: labels outside 0..{self.n_classes - 1}")
        return x, y.astype(np.int64)

    def _info(self, meta) -> dict:
        return {}

    def signature(self) -> dict:
        return archive.signature(self.url)

    def record(self, split: str, index: int) -> Record:
        x, y, (coarse, origin) = self._arrays[split]
        image = x[index].reshape(3, 32, 32).transpose(1, 2, 0)
        batch, row = origin[index]
        extra = {"coarse": int(coarse[index])} if coarse[index] >= 0 else None
        return Record(
            split,
            index,
            int(y[index]),
            np.ascontiguousarray(image),
            f"{self.folder}/{batch}:{row}",
            self.spec,
            extra=extra,
        )


class Cifar10Source(_CifarSource):
    title = "CIFAR-10"
    folder = "cifar-10-batches-py"
    batches = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    meta_file = "batches.meta"
    label_key = "labels"
    names_key = "label_names"
    n_classes = 10


class Cifar100Source(_CifarSource):
    title = "CIFAR-100"
    folder = "cifar-100-python"
    batches = {"train": ["train"], "test": ["test"]}
    meta_file = "meta"
    label_key = "fine_labels"
    names_key = "fine_label_names"
    n_classes = 100

    def _info(self, meta) -> dict:
        """Coarse (superclass) names and the fine -> coarse map, from the training labels."""
        coarse_names = _names(meta.get("coarse_label_names", []))
        _, fine, (coarse, _) = self._arrays["train"]
        fine_to_coarse = {}
        for f, c in zip(fine.tolist(), coarse.tolist(), strict=True):
            fine_to_coarse.setdefault(f, c)
        return {
            "coarse_classes": coarse_names,
            "fine_to_coarse": [fine_to_coarse.get(i, -1) for i in range(self.n_classes)],
        }
