"""Write one WebDataset shard: deterministic bytes, temp name then rename, skipped if already there."""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from typing import Sequence

import fsspec
from PIL import Image

from data_prep.atomic import put_atomic
from data_prep.errors import HardnegError
from data_prep.schema import IMAGE_KEY, JPEG_KEY, LABEL_KEY, META_KEY, sample_key
from data_prep.sources import Record

_CHUNK = 1 << 20
IMAGE_FORMATS = ("auto", "png", "jpg")
AUTO_PNG_MAX_PIXELS = 128 * 128  # auto: PNG (lossless) up to this many pixels, JPEG above
JPEG_QUALITY = 95


def encode_png(image) -> bytes:
    """Lossless PNG bytes of an (H, W, 3) uint8 array."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype.name != "uint8":
        raise ValueError(f"image of shape {image.shape} and dtype {image.dtype}; expected (H, W, 3) uint8")
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def encode_jpeg(record: Record) -> bytes:
    """JPEG bytes: the source's own when it is already an RGB JPEG, else encoded at JPEG_QUALITY."""
    if record.data is not None:
        return record.data
    buf = io.BytesIO()
    Image.fromarray(record.image, mode="RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def use_png(image, image_format: str) -> bool:
    """Whether ``image`` is stored as PNG under ``image_format`` (auto: small images lossless)."""
    if image_format not in IMAGE_FORMATS:
        raise HardnegError(f"image_format={image_format!r}; expected one of: {', '.join(IMAGE_FORMATS)}")
    return image_format == "png" or (image_format == "auto" and image.shape[0] * image.shape[1] <= AUTO_PNG_MAX_PIXELS)


def encode_sample(record: Record, image_format: str = "png") -> dict:
    """The sample of one record, as schema.py lays it out."""
    meta = {"index": record.source_index, "label": record.label, "source": record.source, "file": record.file}
    meta.update(record.extra or {})
    png = use_png(record.image, image_format)
    return {
        "__key__": sample_key(record.split, record.source_index),
        IMAGE_KEY if png else JPEG_KEY: encode_png(record.image) if png else encode_jpeg(record),
        LABEL_KEY: str(int(record.label)).encode("ascii"),
        META_KEY: json.dumps(meta).encode("utf-8"),
    }


def encode_shard(records: Sequence[Record], image_format: str = "png") -> bytes:
    """The tar bytes of a shard: identical records give identical bytes (fixed mtime, owner, mode)."""
    buf = io.BytesIO()
    # imported here: webdataset imports torch (seconds), which `hardneg prep` never needs otherwise
    from webdataset import TarWriter

    writer = TarWriter(buf, encoder=False, mtime=0, user="hardneg", group="hardneg", mode=0o444)  # int: no PAX headers
    for record in records:
        writer.write(encode_sample(record, image_format))
    writer.close()  # closes the tar stream, not ``buf``
    return buf.getvalue()


def file_sha256(fs, path: str) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_shard(records: Sequence[Record], url: str, image_format: str = "png") -> dict:
    """Write ``records`` as the shard at ``url`` unless an identical file is already there."""
    data = encode_shard(records, image_format)
    sha = hashlib.sha256(data).hexdigest()
    fs, path = fsspec.core.url_to_fs(url)
    name = posixpath.basename(path)
    entry = {"path": name, "num_samples": len(records), "bytes": len(data), "sha256": sha}
    if fs.isfile(path) and fs.size(path) == len(data) and file_sha256(fs, path) == sha:
        return entry
    put_atomic(fs, path, data)
    return entry
