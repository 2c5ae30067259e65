"""Tiny ImageNet (``tiny-imagenet-200.zip`` or its folder): train and val, 200 classes of 64x64 JPEGs.

Labels index the sorted WordNet ids of ``wnids.txt``; validation labels come from
``val/val_annotations.txt``. Members are read straight from the zip (never extracted).
"""

from __future__ import annotations

import posixpath

from data_prep import archive
from data_prep.errors import HardnegError
from data_prep.sources import Record, SkipImage, Source, decode_record, is_image_name, skip_entry


class TinyImageNetSource(Source):
    decodes_files = True

    def __init__(self, path, spec: str, test_size: int = 0):
        self.url, self.spec = path, spec
        fs, root = archive.open_fs(path, "PATH")
        kind = archive.kind_of(fs, root, path)
        if kind == "tar":
            raise self._wrong("expected the .zip archive or its extracted folder, got a tar")
        self.tree = archive.ZipTree(path) if kind == "zip" else archive.FolderTree(path)
        names = set(self.tree.names)
        roots = sorted(
            (n[: -len("wnids.txt")] for n in names if posixpath.basename(n) == "wnids.txt" and n.count("/") <= 1),
            key=len,
        )
        if not roots:
            raise self._wrong("no wnids.txt (expected tiny-imagenet-200/wnids.txt)")
        top = roots[0]
        wnids = sorted({w.strip() for w in self._text(top + "wnids.txt").splitlines() if w.strip()})
        if not wnids:
            raise self._wrong("wnids.txt is empty")
        self.classes = wnids
        label_of = {w: i for i, w in enumerate(wnids)}
        words = {}
        if top + "words.txt" in names:
            for line in self._text(top + "words.txt").splitlines():
                wnid, _, text = line.partition("\t")
                if wnid in label_of:
                    words[wnid] = text.strip()
        self.info = {"class_words": [words.get(w, "") for w in wnids]}

        train = []
        for n in sorted(names):
            parts = n[len(top) :].split("/") if n.startswith(top + "train/") else []
            if len(parts) == 4 and parts[2] == "images" and is_image_name(parts[3]):
                if parts[1] not in label_of:
                    raise self._wrong(f"train folder '{parts[1]}' is not in wnids.txt")
                train.append((label_of[parts[1]], n))
        annotations = top + "val/val_annotations.txt"
        if not train or annotations not in names:
            raise self._wrong(f"expected {top}train/<wnid>/images/*.JPEG and {annotations}")
        val, missing = [], []
        for line in sorted(self._text(annotations).splitlines()):
            fields = line.split("\t")
            if len(fields) < 2 or not fields[0].strip():
                continue
            file, wnid = fields[0].strip(), fields[1].strip()
            if wnid not in label_of:
                raise self._wrong(f"val_annotations.txt names '{wnid}', which is not in wnids.txt")
            (val if top + "val/images/" + file in names else missing).append(
                (label_of[wnid], top + "val/images/" + file)
            )
        self.files = {"train": sorted(train, key=lambda t: t[1]), "val": sorted(val, key=lambda t: t[1])}
        self.sizes = {s: len(f) for s, f in self.files.items()}
        self.skipped = [skip_entry("val", -1, f, "listed in val_annotations.txt but missing") for _, f in missing]
        self.skipped += [skip_entry("", -1, f, "link points outside PATH") for f in getattr(self.tree, "outside", [])]

    def _wrong(self, why: str) -> HardnegError:
        return HardnegError(f"'{self.url}' is not Tiny ImageNet (tiny-imagenet-200): {why}")

    def _text(self, name: str) -> str:
        try:
            return self.tree.read(name).decode("utf-8", errors="replace")
        except archive.BROKEN as e:
            raise HardnegError(f"archive '{self.url}' is truncated or corrupt ({type(e).__name__}: {e})") from None

    def signature(self) -> dict:
        return archive.signature(self.url)

    def record(self, split: str, index: int) -> Record:
        label, name = self.files[split][index]
        try:
            data = self.tree.read(name)
        except Exception as e:  # noqa: BLE001 -- a damaged member (CRC, truncation) is one bad input, not a crash
            raise SkipImage(name, f"unreadable: {type(e).__name__}: {e}") from None
        return decode_record(data, split, index, label, name, self.spec)
