"""Write one FFCV ``.beton`` per split: fields ``image`` (RGBImageField) and ``label`` (IntField).

The file is written in this process from a stream of records, in the planned order (FFCV's own
multi-process writer races for pages, so its bytes would differ run to run, and a worker that dies
leaves it waiting forever). It goes to a local temp file, is hashed, then renamed into place or, when
OUT is remote, uploaded under a temp name and renamed there: it appears whole or not at all.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import uuid
from typing import Iterable, Optional

import fsspec
import numpy as np

from data_prep.archive import cache_root, is_local
from data_prep.atomic import put_file_atomic
from data_prep.errors import HardnegError
from data_prep.schema import FFCV_IMAGE_FIELD, FFCV_LABEL_FIELD
from data_prep.wds import AUTO_PNG_MAX_PIXELS, JPEG_QUALITY

PAGE_SIZE = 1 << 23  # 8 MiB, FFCV's default: the largest sample (a raw image) must fit in one page
SMALL_PAGE_SIZE = 1 << 21  # 2 MiB, FFCV's minimum: for datasets of small fixed-size images
_WRITE_MODES = {"png": "raw", "jpg": "jpg", "auto": "smart"}


def unavailable() -> Optional[str]:
    """Why FFCV cannot be used here, or None when it can."""
    try:
        import ffcv.fields  # noqa: F401
        import ffcv.writer  # noqa: F401
    except Exception as e:  # noqa: BLE001 -- ImportError, or a broken native build (OSError, numba errors)
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'import failed'}"
    return None


def require() -> None:
    """HardnegError, one line, when FFCV is unavailable."""
    why = unavailable()
    if why:
        raise HardnegError(
            f"FFCV is unavailable ({why}); install it with `make setup` (it builds ffcv==1.0.2 against "
            f"pkg-config, libopencv-dev and libturbojpeg0-dev) or use --format wds"
        )


def _fields(image_format: str) -> dict:
    from ffcv.fields import IntField, RGBImageField

    image = RGBImageField(
        write_mode=_WRITE_MODES[image_format], smart_threshold=AUTO_PNG_MAX_PIXELS * 3, jpeg_quality=JPEG_QUALITY
    )
    return {FFCV_IMAGE_FIELD: image, FFCV_LABEL_FIELD: IntField()}


def write_beton(
    items: Iterable, max_samples: int, path: str, image_format: str = "auto", page_size: int = PAGE_SIZE
) -> dict:
    """Write the records of ``items`` (skip entries, dicts, pass through) to the local file ``path``.

    Returns {"num_samples", "skipped": [...], "image_size": [h, w] or None}; nothing is written for
    zero records. ``max_samples`` bounds the records (it sizes the metadata table)."""
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter, handle_sample

    fields = _fields(image_format)
    writer = DatasetWriter(path, fields, page_size=page_size, num_workers=1)
    writer.num_samples = max(int(max_samples), 1)
    writer.prepare()  # writes the header and field descriptors, allocates the metadata table
    skipped, sizes, n = [], set(), 0
    metadata = np.frombuffer(writer.metadata_sm.buf, dtype=writer.metadata_type)
    try:
        allocator = MemoryAllocator(path, writer.data_region_start, writer.page_size)
        names = writer.metadata_type.names
        with allocator:
            for item in items:
                if isinstance(item, dict):
                    skipped.append(item)
                    continue
                if n >= max_samples:
                    raise ValueError(f"more than max_samples={max_samples} records")
                try:
                    handle_sample((item.image, int(item.label)), n, names, metadata, allocator, fields)
                except ValueError as e:  # a raw image larger than a page
                    raise HardnegError(
                        f"{item.file or item.source_index}: cannot store in FFCV ({e}); try --image-format jpg"
                    ) from None
                sizes.add(item.image.shape[:2])
                n += 1
        writer.header["num_samples"] = n
        writer.finalize(allocator.allocations)
    finally:
        del metadata
        writer.metadata_sm.close()
        writer.metadata_sm.unlink()
    size = list(sizes.pop()) if len(sizes) == 1 else None
    return {"num_samples": n, "skipped": skipped, "image_size": [int(v) for v in size] if size else None}


def staging_path(url: str) -> str:
    """A fresh local temp path for the file that will become ``url`` (beside it when ``url`` is local)."""
    fs, path = fsspec.core.url_to_fs(url)
    directory, name = posixpath.split(path)
    if not is_local(fs):
        directory = os.path.join(cache_root(), "staging")
        os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex}")


def publish(local: str, url: str) -> dict:
    """Move the finished local file to ``url`` atomically; its {"path", "bytes", "sha256"}."""
    digest = hashlib.sha256()
    with open(local, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    size = os.path.getsize(local)
    fs, path = fsspec.core.url_to_fs(url)
    name = posixpath.basename(path)
    put_file_atomic(fs, local, path)
    return {"path": name, "bytes": size, "sha256": digest.hexdigest()}


def write_split(
    items: Iterable, max_samples: int, url: str, image_format: str = "auto", page_size: int = PAGE_SIZE
) -> dict:
    """Write and publish the FFCV file of one split: {"entry" (None if no records), "skipped"}."""
    local = staging_path(url)
    try:
        info = write_beton(items, max_samples, local, image_format, page_size)
        if info["num_samples"] == 0:
            return {"entry": None, "skipped": info["skipped"]}
        entry = publish(local, url)
    except OSError as e:  # the local disk filling up while FFCV writes
        raise HardnegError(f"cannot write '{url}': {type(e).__name__}: {e}; the partial file was removed") from None
    finally:
        if os.path.exists(local):
            os.remove(local)
    entry.update(num_samples=info["num_samples"], image_size=info["image_size"])
    return {"entry": entry, "skipped": info["skipped"]}


def header_samples(head: bytes) -> int:
    """Samples an FFCV file holds, from its first bytes; ValueError if they are not an FFCV header."""
    from ffcv.types import CURRENT_VERSION, HeaderType

    if len(head) < HeaderType.itemsize:
        raise ValueError("too short for an FFCV header")
    header = np.frombuffer(head[: HeaderType.itemsize], dtype=HeaderType)[0]
    if header["version"] != CURRENT_VERSION:
        raise ValueError(f"version {header['version']}, expected {CURRENT_VERSION}")
    return int(header["num_samples"])
