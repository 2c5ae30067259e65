"""Random access to the images of stream-only inputs (parquet files, WebDataset tars) through a local spool.

Prep shuffles each split globally, so every shard job wants images from every input file. Reading a
parquet row group or a compressed tar per image would make prep quadratic; instead each input file is
streamed once, its image bytes appended to ``data.bin`` in a cache folder (one per input file and
options, keyed by the file's size and mtime), and an index (offsets, lengths, per-sample metadata)
written last. A spool whose index exists is whole (both files appear by rename) and is reused by
reruns, by worker processes and by later runs. Memory stays flat: one image at a time is held.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Iterator, Optional

from data_prep.archive import cache_root
from data_prep.atomic import atomic_open, write_json_atomic
from data_prep.errors import HardnegError

# (image bytes or None, metadata dict for this sample, or None for none)
Item = tuple[Optional[bytes], dict]


class Spool:
    """The spooled image bytes of one input file: ``read(i)`` and the per-sample ``meta[i]``."""

    def __init__(self, folder: str, index: dict):
        self.folder = folder
        import numpy as np

        self.offsets = np.asarray(index["offsets"], dtype=np.int64)  # arrays: 16 bytes per sample in memory
        self.lengths = np.asarray(index["lengths"], dtype=np.int64)  # -1: the sample had no image bytes
        self.meta: list[dict] = index["meta"]  # empty when the source keeps no per-sample metadata
        self.info: dict = index.get("info", {})
        self._file = None

    def __getstate__(self):
        return dict(self.__dict__, _file=None)

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, i: int) -> Optional[bytes]:
        """The image bytes of sample ``i`` (None if it had none)."""
        if self.lengths[i] < 0:
            return None
        if self._file is None or self._file[0] != os.getpid():  # a forked worker opens its own
            self._file = (os.getpid(), os.open(os.path.join(self.folder, "data.bin"), os.O_RDONLY))
        return os.pread(self._file[1], int(self.lengths[i]), int(self.offsets[i]))


def spool_key(*parts) -> str:
    """A cache folder name for an input file identified by ``parts`` (JSON-able)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _load(folder: str) -> Optional[Spool]:
    try:
        with open(os.path.join(folder, "index.json"), "rb") as f:
            index = json.loads(f.read().decode("utf-8"))
        if os.path.getsize(os.path.join(folder, "data.bin")) != index["bytes"]:
            return None
        return Spool(folder, index)
    except (OSError, ValueError, KeyError):
        return None


def open_spool(key: str, items: Callable[[], Iterator[Item]], info: Callable[[], dict] = dict) -> Spool:
    """The spool ``key``: reused when whole, else built by streaming ``items()`` once (temp names, then rename)."""
    folder = os.path.join(cache_root(), "spool", key)
    done = _load(folder)
    if done is not None:
        return done
    os.makedirs(folder, exist_ok=True)
    offsets, lengths, meta, pos = [], [], [], 0
    try:  # data.bin first, index.json last: _load trusts a spool only when the index names data.bin's size
        with atomic_open(os.path.join(folder, "data.bin")) as f:
            for blob, m in items():
                offsets.append(pos)
                lengths.append(-1 if blob is None else len(blob))
                if m is not None:
                    meta.append(m)
                if blob is not None:
                    f.write(blob)
                    pos += len(blob)
        index = {"offsets": offsets, "lengths": lengths, "meta": meta, "bytes": pos, "info": info()}
        write_json_atomic(os.path.join(folder, "index.json"), index)
    except OSError as e:
        raise HardnegError(
            f"cannot write the spool in {folder}: {type(e).__name__}: {e} (set HARDNEG_CACHE_DIR)"
        ) from None
    return Spool(folder, index)


def split_options(path: str, defaults: dict[str, str], spec: str) -> tuple[str, dict[str, str]]:
    """``PATH?key=value&key=value`` -> (PATH, options over ``defaults``); HardnegError on an unknown key."""
    base, sep, query = path.rpartition("?")
    if not sep or "=" not in query:
        return path, dict(defaults)
    options = dict(defaults)
    for pair in query.split("&"):
        key, eq, value = pair.partition("=")
        if not eq or key not in defaults:
            raise HardnegError(f"option '{pair}' in '{spec}'; expected {' and/or '.join(k + '=...' for k in defaults)}")
        options[key] = value
    return base, options


# File-name words that name a split (Hugging Face's parquet exports, our own shard names).
SPLIT_WORDS = ("train", "test", "validation", "valid", "val", "unlabeled", "unsupervised")


def split_of(relative: str) -> str:
    """The split an input file belongs to: a split-named folder, else the file name's first word, else train."""
    import re

    parts = relative.split("/")
    for folder in reversed(parts[:-1]):
        if folder in SPLIT_WORDS:
            return folder
    first = re.split(r"[-_.]", parts[-1], maxsplit=1)[0]
    return first if first in SPLIT_WORDS else "train"
