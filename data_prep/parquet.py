"""``parquet:PATH``: Hugging Face ``datasets`` parquet exports (or any parquet with image bytes and int labels).

PATH is a file, a folder (every ``*.parquet`` under it) or a glob, on any fsspec URL. The image column
holds ``{"bytes": ..., "path": ...}`` (the ``datasets`` Image feature) or raw bytes; the label column is
an integer (a ``ClassLabel``: its names become the classes; null or -1: unlabelled). Column names are
options: ``parquet:PATH?image=img&label=fine_label`` (``label=`` with no name: no labels at all).
A file's split is a split-named folder (``plain_text/train/0000.parquet``) or its first word
(``train-00000-of-00002.parquet``), else ``train``. Image bytes are spooled once (data_prep/spool.py).
"""

from __future__ import annotations

import bisect
import json
import posixpath

import numpy as np

from data_prep import archive
from data_prep.errors import HardnegError
from data_prep.sources import Record, SkipImage, Source, decode_record
from data_prep.spool import Spool, open_spool, split_of, split_options, spool_key

DEFAULTS = {"image": "image", "label": "label"}
_BATCH = 64  # rows per read while spooling


def list_files(url: str, suffixes: tuple[str, ...], what: str) -> tuple[object, list[tuple[str, str]]]:
    """(fs, [(path, name relative to PATH)]) of the input files: PATH a file, a folder or a glob."""
    fs, root = archive.open_fs(url, "PATH")
    try:
        if any(c in root for c in "*?["):
            paths = sorted(fs.glob(root))
            base = posixpath.dirname(root.split("*")[0].split("?")[0].split("[")[0])
        elif fs.isdir(root):
            paths = sorted(p for p in fs.find(root) if p.endswith(suffixes))
            base = root
        elif fs.isfile(root):
            paths, base = [root], posixpath.dirname(root)
        else:
            raise HardnegError(f"{what} PATH '{url}' does not exist")
    except HardnegError:
        raise
    except Exception as e:  # noqa: BLE001 -- fsspec backends raise their own types: one line
        raise HardnegError(f"cannot read {what} PATH '{url}': {type(e).__name__}: {e}") from None
    if not paths:
        raise HardnegError(f"{what} PATH '{url}' has no {' or '.join(suffixes)} files")
    return fs, [(p, posixpath.relpath(p, base) if base else p) for p in paths]


def _hf_classes(schema, column: str):
    """Class names of a ``datasets`` ClassLabel column, from the file's ``huggingface`` metadata (or None)."""
    try:
        meta = json.loads((schema.metadata or {}).get(b"huggingface", b"{}"))
        feature = meta.get("info", {}).get("features", {}).get(column, {})
        names = feature.get("names") if feature.get("_type") == "ClassLabel" else None
        return [str(n) for n in names] if names else None
    except (ValueError, AttributeError, TypeError):  # metadata that is not JSON or of another shape: no names
        return None


def _image_values(column):
    """The bytes of an image column chunk: a ``{"bytes": ...}`` struct or a binary column."""
    import pyarrow as pa

    if pa.types.is_struct(column.type):
        column = column.field("bytes")
    return column.to_pylist()


class ParquetSource(Source):
    decodes_files = True

    def __init__(self, path, spec: str, test_size: int = 0):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.spec = spec
        self.url, self.options = split_options(path, DEFAULTS, spec)
        image, label = self.options["image"], self.options["label"]
        if not image:
            raise HardnegError(f"'{spec}': image= needs a column name")
        self.fs, files = list_files(self.url, (".parquet",), "parquet")
        self.files: list[dict] = []
        labels: dict[str, list] = {}
        names = None
        for path, rel in files:
            try:
                with self.fs.open(path, "rb") as f:
                    pf = pq.ParquetFile(f)
                    schema, rows = pf.schema_arrow, pf.metadata.num_rows
                    columns = schema.names
                    if image not in columns or (label and label not in columns):
                        missing = image if image not in columns else label
                        key = "image" if missing == image else "label"
                        raise HardnegError(
                            f"parquet file '{rel}' has no column '{missing}' (columns: "
                            f"{', '.join(columns)}); name it with {spec.split('?')[0]}?{key}=COLUMN"
                        )
                    kind = schema.field(image).type
                    if not (
                        pa.types.is_binary(kind)
                        or pa.types.is_large_binary(kind)
                        or (
                            pa.types.is_struct(kind)
                            and kind.get_field_index("bytes") >= 0
                            and (
                                pa.types.is_binary(kind.field("bytes").type)
                                or pa.types.is_large_binary(kind.field("bytes").type)
                            )
                        )
                    ):
                        raise HardnegError(
                            f"column '{image}' of parquet file '{rel}' is {kind}; expected image bytes "
                            f"(binary or a struct with a 'bytes' field)"
                        )
                    values = np.full(rows, -1, dtype=np.int64)
                    if label:
                        kind = schema.field(label).type
                        if not pa.types.is_integer(kind):
                            raise HardnegError(
                                f"column '{label}' of parquet file '{rel}' is {kind}; expected integer "
                                f"labels (or {spec.split('?')[0]}?label= for none)"
                            )
                        values = pf.read(columns=[label]).column(0).fill_null(-1).to_numpy().astype(np.int64)
                    names = names or (_hf_classes(schema, label) if label else None)
            except HardnegError:
                raise
            except Exception as e:  # noqa: BLE001 -- not parquet, truncated, unreachable
                raise HardnegError(
                    f"cannot read parquet file '{rel}': {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                ) from None
            split = split_of(rel)
            start = sum(len(v) for v in labels.get(split, []))
            self.files.append({"path": path, "rel": rel, "split": split, "start": start, "rows": rows})
            labels.setdefault(split, []).append(values)
        self.labels = {s: np.concatenate(v) for s, v in labels.items()}
        self.sizes = {s: len(v) for s, v in self.labels.items()}
        top = max((int(v.max()) for v in self.labels.values() if len(v)), default=-1)
        self.classes = names or [str(i) for i in range(top + 1)]
        self._in_split = {s: [i for i, f in enumerate(self.files) if f["split"] == s] for s in self.sizes}
        self._starts = {s: [self.files[i]["start"] for i in idx] for s, idx in self._in_split.items()}
        self._spools: dict[int, Spool] = {}
        for i in range(len(self.files)):  # spooled once here, so worker processes only read
            self._spool(i)

    def __getstate__(self):
        return dict(self.__dict__, _spools={})

    def _spool(self, i: int) -> Spool:
        if i not in self._spools:
            import pyarrow.parquet as pq

            entry, image = self.files[i], self.options["image"]
            key = spool_key("parquet", self.fs.protocol, entry["path"], self._identity(entry["path"]), image)

            def items():
                try:
                    with self.fs.open(entry["path"], "rb") as f:
                        for batch in pq.ParquetFile(f).iter_batches(batch_size=_BATCH, columns=[image]):
                            for value in _image_values(batch.column(0)):
                                yield value, None
                except Exception as e:  # noqa: BLE001 -- pyarrow and fsspec raise their own types (truncated file, unreachable): one line
                    raise HardnegError(
                        f"cannot read parquet file '{entry['rel']}': {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}"
                    ) from None

            self._spools[i] = open_spool(key, items)
        return self._spools[i]

    def _identity(self, path: str) -> list:
        info = self.fs.info(path)
        mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("updated")
        return [info.get("size"), str(mtime) if mtime is not None else info.get("ETag") or info.get("etag")]

    def signature(self) -> dict:
        return {"options": self.options, "files": [[f["rel"], self._identity(f["path"])] for f in self.files]}

    def record(self, split: str, index: int) -> Record:
        starts = self._starts[split]
        k = bisect.bisect_right(starts, index) - 1
        i = self._in_split[split][k]
        row = index - starts[k]
        name = f"{self.files[i]['rel']}:{row}"
        label = int(self.labels[split][index])
        if label < -1 or label >= len(self.classes):
            raise SkipImage(name, f"label {label} out of range for {len(self.classes)} classes")
        data = self._spool(i).read(row)
        if data is None:
            raise SkipImage(name, "no image bytes (null)")
        return decode_record(data, split, index, label, name, self.spec)
