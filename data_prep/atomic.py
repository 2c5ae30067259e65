"""One way to write a file so that it appears whole or not at all: a temp name beside it, then a rename.

Every writer of the project (shards, manifests, spools, caches, reports, checkpoints' meta, the tracking
spool) goes through these, so a crash, a full disk or a Ctrl-C never leaves a half-written file under the
real name. The temp name is unique (several ranks or processes may write the same target at once; each
renames whole, the last one wins).
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import uuid
from contextlib import contextmanager
from typing import IO, Any, Callable, Iterator

from data_prep.errors import HardnegError


def _temp_beside(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex}")


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A local temp path beside ``path`` to fill; renamed onto ``path`` when the block ends without an error,
    removed otherwise."""
    tmp = _temp_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_dir(path: str, replace: bool = False) -> Iterator[str]:
    """A temp directory beside ``path`` (created unless the block creates it, e.g. copytree) to fill; renamed
    onto ``path`` when the block ends without an error (an existing ``path`` is removed first when ``replace``),
    removed otherwise."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = _temp_beside(os.path.join(parent, os.path.basename(path)))
    try:
        yield tmp
        if replace and os.path.exists(path):
            shutil.rmtree(path)
        os.rename(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


@contextmanager
def atomic_open(path: str, mode: str = "wb") -> Iterator[IO[Any]]:
    """``open(path, mode)`` for writing through atomic_path (``mode`` "wb" or "w"; text is UTF-8)."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f


def write_atomic(path: str, data: bytes | str) -> None:
    """Write ``data`` to the local ``path`` whole or not at all."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def write_json_atomic(path: str, payload: Any, indent: int | None = None) -> None:
    """``json.dump`` to the local ``path`` whole or not at all."""
    write_atomic(path, json.dumps(payload, indent=indent))


def _put_via_temp(fs, path: str, write: Callable[[str], None]) -> None:
    directory, name = posixpath.split(path)
    tmp = posixpath.join(directory, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        write(tmp)
        fs.mv(tmp, path)
    except Exception as e:  # noqa: BLE001 -- any backend's error becomes one line; the finally removes the partial file
        raise HardnegError(f"cannot write '{path}': {type(e).__name__}: {e}; the partial file was removed") from None
    finally:
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        except Exception:  # noqa: BLE001 -- cleanup errors never mask the error being handled
            pass


def put_atomic(fs, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` on any fsspec filesystem through a temp name in the same folder, then rename.

    Any failure (a full disk, a lost connection) is one HardnegError; the partial temp file is removed."""

    def write(tmp: str) -> None:
        with fs.open(tmp, "wb") as f:
            f.write(data)

    _put_via_temp(fs, path, write)


def put_file_atomic(fs, local: str, path: str) -> None:
    """Move the finished local file ``local`` to ``path`` on any fsspec filesystem, whole or not at all."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        try:
            os.replace(local, path)
        except OSError as e:
            raise HardnegError(f"cannot write '{path}': {e.strerror or e}") from None
        return
    _put_via_temp(fs, path, lambda tmp: fs.put_file(local, tmp))
