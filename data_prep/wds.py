"""Write one WebDataset shard: deterministic bytes, temp name then rename, skipped if already there."""
from __future__ import annotations

import hashlib
import io
import json
import posixpath
import uuid
from typing import Sequence

import fsspec
from PIL import Image
from webdataset import TarWriter

from data_prep.schema import IMAGE_KEY, LABEL_KEY, META_KEY, sample_key
from data_prep.sources import Record

_CHUNK = 1 << 20


def encode_png(image) -> bytes:
    """Lossless PNG bytes of an (H, W, 3) uint8 array."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype.name != "uint8":
        raise ValueError(f"image of shape {image.shape} and dtype {image.dtype}; expected (H, W, 3) uint8")
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def encode_sample(record: Record) -> dict:
    """The sample of one record, as schema.py lays it out."""
    meta = {"index": record.source_index, "label": record.label, "source": record.source, "file": record.file}
    return {
        "__key__": sample_key(record.split, record.source_index),
        IMAGE_KEY: encode_png(record.image),
        LABEL_KEY: str(int(record.label)).encode("ascii"),
        META_KEY: json.dumps(meta).encode("utf-8"),
    }


def encode_shard(records: Sequence[Record]) -> bytes:
    """The tar bytes of a shard: identical records give identical bytes (fixed mtime, owner, mode)."""
    buf = io.BytesIO()
    writer = TarWriter(buf, encoder=False, mtime=0.0, user="hardneg", group="hardneg", mode=0o444)
    for record in records:
        writer.write(encode_sample(record))
    writer.close()  # closes the tar stream, not ``buf``
    return buf.getvalue()


def file_sha256(fs, path: str) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _remove_quietly(fs, path: str) -> None:
    """Remove ``path`` if it exists; cleanup errors never mask the error being handled."""
    try:
        if fs.exists(path):
            fs.rm(path)
    except Exception:
        pass


def write_shard(records: Sequence[Record], url: str) -> dict:
    """Write ``records`` as the shard at ``url`` unless an identical file is already there."""
    data = encode_shard(records)
    sha = hashlib.sha256(data).hexdigest()
    fs, path = fsspec.core.url_to_fs(url)
    directory, name = posixpath.split(path)
    entry = {"path": name, "num_samples": len(records), "bytes": len(data), "sha256": sha}
    if fs.isfile(path) and fs.size(path) == len(data) and file_sha256(fs, path) == sha:
        return entry
    tmp = posixpath.join(directory, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    finally:
        _remove_quietly(fs, tmp)
    return entry
