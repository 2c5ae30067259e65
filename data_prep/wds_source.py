"""``wds:URL_PATTERN``: existing WebDataset shards (from another tool), re-sharded into ours.

URL_PATTERN is WebDataset's brace notation (``/data/shards/train-{000000..000099}.tar``), a folder (every
``.tar``/``.tar.gz``/``.tgz`` under it) or a glob, on any fsspec URL. A sample is the tar members sharing a
key (WebDataset's convention: the name up to the first dot of its base name). The image is the first
member with an extension of ``image`` (default ``jpg;jpeg;png;webp;ppm;bmp;tif;tiff``), the label the
``label`` member (default ``cls``: an ASCII integer; a ``json`` member's ``"label"``); options go after
``?``: ``wds:PATTERN?image=webp&label=json`` (``label=`` with no name: unlabelled). A shard's split is
its split-named folder or first word (``train-000000.tar``), else ``train``. Shards are streamed once
into a local spool (data_prep/spool.py).
"""

from __future__ import annotations

import bisect
import json
import posixpath
import re
import tarfile

from data_prep import archive
from data_prep.errors import HardnegError
from data_prep.parquet import list_files
from data_prep.sources import Record, SkipImage, Source, decode_record
from data_prep.spool import Spool, open_spool, split_of, split_options, spool_key

DEFAULTS = {"image": "jpg;jpeg;png;webp;ppm;bmp;tif;tiff", "label": "cls"}
SUFFIXES = (".tar", ".tar.gz", ".tgz")
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def parse_label(data: bytes, ext: str):
    """The integer label of a ``cls``-like member (ASCII integer) or a ``json`` member's "label"."""
    text = data.decode("utf-8", "replace").strip()
    value = json.loads(text).get("label") if ext == "json" else text
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"label {value!r} is not an integer")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"label {value[:40]!r} is not an integer") from None


def samples(members, images: list[str], label: str):
    """(image bytes or None, {"key", "label", "problem"}) per sample of consecutive (name, bytes) members."""
    current, parts = None, {}

    def emit():
        meta = {"key": current, "label": -1, "problem": None}
        image = next((parts[e] for e in images if e in parts), None)
        if image is None:
            meta["problem"] = f"no image member (.{' .'.join(images)})"
        if label:
            if label not in parts:
                meta["problem"] = meta["problem"] or f"no .{label} member"
            else:
                try:
                    meta["label"] = parse_label(parts[label], label)
                except ValueError as e:
                    meta["problem"] = meta["problem"] or str(e)
                if meta["label"] < -1:
                    meta["problem"] = meta["problem"] or f"label {meta['label']} is negative"
        return image, meta

    for name, data in members:
        m = _KEY.match(name)
        if not m:
            continue
        key, ext = m.group(1), m.group(2).lower()
        if key != current and current is not None:
            yield emit()
            parts = {}
        current = key
        if ext in images or ext == label:
            parts.setdefault(ext, data)
    if current is not None:
        yield emit()


class WdsSource(Source):
    decodes_files = True

    def __init__(self, path, spec: str, test_size: int = 0):
        from braceexpand import braceexpand

        self.spec = spec
        self.url, self.options = split_options(path, DEFAULTS, spec)
        self.images = [e.strip().lower() for e in self.options["image"].split(";") if e.strip()]
        if not self.images:
            raise HardnegError(f"'{spec}': image= needs at least one extension")
        urls = list(braceexpand(self.url))
        if len(urls) == 1:
            self.fs, files = list_files(urls[0], SUFFIXES, "WebDataset")
        else:
            self.fs, _ = archive.open_fs(urls[0], "URL_PATTERN")
            files = [(archive.open_fs(u, "URL_PATTERN")[1], posixpath.basename(u)) for u in urls]
        self.files = [{"path": p, "rel": rel, "split": split_of(rel)} for p, rel in files]
        self._spools: dict[int, Spool] = {}
        sizes: dict[str, int] = {}
        top = -1
        for i, f in enumerate(self.files):
            spool = self._spool(i)
            f["start"], f["count"] = sizes.get(f["split"], 0), len(spool)
            sizes[f["split"]] = f["start"] + len(spool)
            top = max([top] + [m["label"] for m in spool.meta if m["problem"] is None])
        self.sizes = {s: n for s, n in sizes.items() if n}
        if not self.sizes:
            raise HardnegError(f"WebDataset shards '{self.url}' hold no samples")
        self.classes = [str(i) for i in range(top + 1)]
        self._in_split = {
            s: [i for i, f in enumerate(self.files) if f["split"] == s and f["count"]] for s in self.sizes
        }
        self._starts = {s: [self.files[i]["start"] for i in idx] for s, idx in self._in_split.items()}

    def __getstate__(self):
        return dict(self.__dict__, _spools={})

    def _identity(self, path: str) -> list:
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            raise HardnegError(f"WebDataset shard '{path}' does not exist") from None
        except Exception as e:  # noqa: BLE001 -- fsspec backends raise their own types: one line
            raise HardnegError(f"cannot read WebDataset shard '{path}': {type(e).__name__}: {e}") from None
        mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("updated")
        return [info.get("size"), str(mtime) if mtime is not None else info.get("ETag") or info.get("etag")]

    def _spool(self, i: int) -> Spool:
        if i not in self._spools:
            entry = self.files[i]
            key = spool_key(
                "wds",
                self.fs.protocol,
                entry["path"],
                self._identity(entry["path"]),
                self.images,
                self.options["label"],
            )

            def members():
                with self.fs.open(entry["path"], "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                    for member in tar:
                        if member.isfile():
                            yield member.name, tar.extractfile(member).read()

            def items():
                try:
                    yield from samples(members(), self.images, self.options["label"])
                except archive.BROKEN as e:
                    raise HardnegError(
                        f"cannot read WebDataset shard '{entry['rel']}': truncated or corrupt ({type(e).__name__}: {e})"
                    ) from None

            self._spools[i] = open_spool(key, items)
        return self._spools[i]

    def signature(self) -> dict:
        return {"options": self.options, "files": [[f["rel"], self._identity(f["path"])] for f in self.files]}

    def record(self, split: str, index: int) -> Record:
        k = bisect.bisect_right(self._starts[split], index) - 1
        i = self._in_split[split][k]
        row = index - self._starts[split][k]
        spool = self._spool(i)
        meta = spool.meta[row]
        name = f"{self.files[i]['rel']}:{meta['key']}"
        if meta["problem"]:
            raise SkipImage(name, meta["problem"])
        return decode_record(spool.read(row), split, index, meta["label"], name, self.spec)
