"""STL-10, binary version: ``stl10_binary.tar.gz`` or its folder -- train, test and the 100k unlabeled split.

The ``*_X.bin`` files are fixed-size records (3 x 96 x 96 bytes, column-major), read by memory map so the
unlabeled split (2.7 GB) is never held in memory. From a tar or a remote folder they are first copied,
decompressed, into the local cache under names we choose (nothing of the archive's is ever written).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath

import numpy as np

from data_prep import archive
from data_prep.atomic import atomic_path, write_json_atomic
from data_prep.errors import HardnegError
from data_prep.sources import Record, Source

FOLDER = "stl10_binary"
IMAGE_BYTES = 3 * 96 * 96
SPLITS = {
    "train": ("train_X.bin", "train_y.bin"),
    "test": ("test_X.bin", "test_y.bin"),
    "unlabeled": ("unlabeled_X.bin", None),
}
REQUIRED = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "class_names.txt")


class Stl10Source(Source):
    """Labels 1..10 in the files become 0..9; the unlabeled split has label -1."""

    def __init__(self, path, spec: str, test_size: int = 0):
        self.url, self.spec = path, spec
        fs, root = archive.open_fs(path, "PATH")
        self.kind = archive.kind_of(fs, root, path)
        if self.kind == "zip":
            raise self._wrong("expected the .tar.gz archive or its extracted folder, got a zip")
        self._sig = archive.signature(path)
        self._local = None
        files = self._local_files()
        missing = [f for f in REQUIRED if f not in files]
        if missing:
            raise self._wrong(f"missing {', '.join(missing)} (looked for {FOLDER}/...)")
        with open(files["class_names.txt"], encoding="utf-8", errors="replace") as f:
            self.classes = [line.strip() for line in f if line.strip()]
        if len(self.classes) != 10:
            raise self._wrong(f"class_names.txt names {len(self.classes)} classes, expected 10")
        self.sizes = {}
        for split, (x_name, y_name) in SPLITS.items():
            if x_name not in files:
                continue
            size = os.path.getsize(files[x_name])
            if size % IMAGE_BYTES:
                raise self._wrong(f"{x_name} holds {size} bytes, not a multiple of {IMAGE_BYTES} (truncated?)")
            n = size // IMAGE_BYTES
            if y_name is not None:
                labels = np.fromfile(files[y_name], dtype=np.uint8)
                if len(labels) != n:
                    raise self._wrong(f"{y_name} holds {len(labels)} labels for {n} images")
                if n and (labels.min() < 1 or labels.max() > 10):
                    raise self._wrong(f"{y_name} has labels outside 1..10")
            self.sizes[split] = n
        self._maps = {}

    def __getstate__(self):
        return {k: ({} if k == "_maps" else None if k == "_local" else v) for k, v in self.__dict__.items()}

    def _wrong(self, why: str) -> HardnegError:
        return HardnegError(f"'{self.url}' is not the STL-10 binary version: {why}")

    def _local_files(self) -> dict[str, str]:
        """Base name -> local path of each wanted file (spooled into the cache unless a local folder)."""
        if self._local is not None:
            return self._local
        wanted = set(REQUIRED) | {x for x, _ in SPLITS.values()}

        def member_of(name: str):
            base, parent = posixpath.basename(name), posixpath.basename(posixpath.dirname(name))
            return base if base in wanted and parent in ("", FOLDER) else None

        key = hashlib.sha256(json.dumps(self._sig, sort_keys=True).encode()).hexdigest()[:24]
        cache = os.path.join(archive.cache_root(), "sources", key)
        index = os.path.join(cache, "index.json")
        if self.kind == "tar" and os.path.isfile(index):  # spooled before (by this or another process)
            with open(index, encoding="utf-8") as f:
                local = json.load(f)
            if all(os.path.isfile(p) for p in local.values()):
                self._local = local
                return local
        if self.kind == "tar":
            spooled = archive.tar_spool(self.url, lambda n: member_of(n) is not None, cache)
            local = {member_of(n): p for n, p in spooled.items()}
            write_json_atomic(index, local)
        else:
            tree = archive.FolderTree(self.url)
            names = {member_of(n): n for n in tree.names if member_of(n) is not None}
            if archive.is_local(tree.fs):
                local = {base: tree.path(n) for base, n in names.items()}
            else:
                os.makedirs(cache, exist_ok=True)
                local = {}
                for base, n in names.items():
                    target = os.path.join(cache, base)
                    if not (os.path.isfile(target) and os.path.getsize(target) == tree.names[n]):
                        with atomic_path(target) as tmp:
                            tree.fs.get_file(tree.path(n), tmp)
                    local[base] = target
        self._local = local
        return local

    def signature(self) -> dict:
        return self._sig

    def _arrays(self, split: str):
        if split not in self._maps:
            files = self._local_files()
            x_name, y_name = SPLITS[split]
            x = np.memmap(files[x_name], dtype=np.uint8, mode="r").reshape(-1, 3, 96, 96)
            y = np.fromfile(files[y_name], dtype=np.uint8).astype(np.int64) - 1 if y_name else None
            self._maps[split] = (x, y)
        return self._maps[split]

    def record(self, split: str, index: int) -> Record:
        x, y = self._arrays(split)
        image = np.ascontiguousarray(x[index].transpose(2, 1, 0))  # column-major (C, W, H) -> (H, W, C)
        label = int(y[index]) if y is not None else -1
        return Record(split, index, label, image, f"{FOLDER}/{SPLITS[split][0]}:{index}", self.spec)
