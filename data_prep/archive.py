"""Read the files of a dataset PATH -- a folder, a tar (any compression) or a zip, on any fsspec URL --
without extracting anything: members are read into memory, or spooled to files whose names we choose.

Every member name is checked first: an absolute path, a ``..`` component or a link pointing out of the
archive makes the whole archive refused (a one-line HardnegError), so nothing can land outside a target.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat
import tarfile
import zipfile
import zlib
from typing import Callable, Iterator, Optional

import fsspec

from data_prep.atomic import atomic_open
from data_prep.errors import HardnegError

_CHUNK = 1 << 20
# Decompression and truncation errors tarfile/zipfile/gzip raise on a damaged archive.
BROKEN = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError, ValueError)


def open_fs(url: str, what: str):
    """(filesystem, path) of ``url``; HardnegError naming ``what`` if fsspec cannot open it."""
    if not isinstance(url, str) or not url:
        raise HardnegError(f"{what}={url!r}; expected a path or an fsspec URL")
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except Exception as e:  # noqa: BLE001 -- unknown protocol, missing driver
        raise HardnegError(f"cannot use {what} '{url}': {type(e).__name__}: {e}") from None
    return fs, path.rstrip("/") or "/"


def kind_of(fs, path: str, url: str) -> str:
    """'dir', 'zip' or 'tar' by content (not by name); HardnegError if missing, unreachable or other."""
    try:
        if fs.isdir(path):
            return "dir"
        if not fs.isfile(path):
            raise HardnegError(f"'{url}' does not exist")
        with fs.open(path, "rb") as f:
            head = f.read(512)
    except HardnegError:
        raise
    except Exception as e:  # noqa: BLE001 -- fsspec backends raise their own types (botocore, gcsfs, aiohttp): one line
        raise HardnegError(
            f"cannot read '{url}': {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    if head[:4] == b"PK\x03\x04" or head[:4] == b"PK\x05\x06":
        return "zip"
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00" or head[257:262] == b"ustar":
        return "tar"
    raise HardnegError(f"'{url}' is neither a folder, a tar archive nor a zip archive")


def safe_member(name: str, archive: str, link: Optional[str] = None) -> str:
    """The normalised relative name of an archive member; HardnegError if it (or its link) escapes."""

    def escapes(p: str) -> bool:
        return p.startswith(("/", "\\")) or (len(p) > 1 and p[1] == ":") or ".." in p.replace("\\", "/").split("/")

    if escapes(name):
        raise HardnegError(f"archive '{archive}' has a member escaping its root: '{name}'; refusing the archive")
    if link is not None:
        target = posixpath.normpath(posixpath.join(posixpath.dirname(name), link))
        if link.startswith("/") or target.startswith("..") or escapes(target):
            raise HardnegError(
                f"archive '{archive}' has a link escaping its root: '{name}' -> '{link}'; refusing the archive"
            )
    norm = posixpath.normpath(name)
    return "" if norm == "." else norm


def _tar_members(f, url: str) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo, str]]:
    """(tar, member, safe name) for every member of a tar stream, checking each name as it comes."""
    with tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            link = member.linkname if (member.issym() or member.islnk()) else None
            yield tar, member, safe_member(member.name, url, link)


def tar_read(url: str, want: Callable[[str], bool]) -> dict[str, bytes]:
    """{name: bytes} of the regular members ``want(name)`` accepts, in one streaming pass."""
    fs, path = open_fs(url, "PATH")
    found: dict[str, bytes] = {}
    try:
        with fs.open(path, "rb") as f:
            for tar, member, name in _tar_members(f, url):
                if member.isfile() and want(name):
                    found[name] = tar.extractfile(member).read()
    except HardnegError:
        raise
    except BROKEN as e:
        raise HardnegError(f"archive '{url}' is truncated or corrupt ({type(e).__name__}: {e})") from None
    return found


def tar_spool(url: str, want: Callable[[str], bool], cache_dir: str) -> dict[str, str]:
    """{name: local file} of the wanted members, decompressed once into ``cache_dir`` under hashed names.

    Reused when already there (they appear by rename, so a file there is whole)."""
    fs, path = open_fs(url, "PATH")
    os.makedirs(cache_dir, exist_ok=True)
    local: dict[str, str] = {}
    try:
        with fs.open(path, "rb") as f:
            for tar, member, name in _tar_members(f, url):
                if not (member.isfile() and want(name)):
                    continue
                target = os.path.join(cache_dir, hashlib.sha256(name.encode()).hexdigest()[:24] + ".bin")
                if not (os.path.isfile(target) and os.path.getsize(target) == member.size):
                    with tar.extractfile(member) as src, atomic_open(target) as dst:
                        for chunk in iter(lambda: src.read(_CHUNK), b""):
                            dst.write(chunk)
                local[name] = target
    except HardnegError:
        raise
    except BROKEN as e:
        raise HardnegError(f"archive '{url}' is truncated or corrupt ({type(e).__name__}: {e})") from None
    return local


class ZipTree:
    """Random access to the members of a zip on any fsspec URL; picklable (reopens lazily per process)."""

    def __init__(self, url: str):
        self.url = url
        self._zip = None
        try:
            names = self._open().infolist()
        except HardnegError:
            raise
        except BROKEN as e:
            raise HardnegError(f"archive '{url}' is truncated or corrupt ({type(e).__name__}: {e})") from None
        self.names: dict[str, str] = {}  # safe name -> name in the zip
        for info in names:
            is_link = stat.S_ISLNK(info.external_attr >> 16)
            link = self._zip.read(info).decode("utf-8", "replace") if is_link else None
            safe = safe_member(info.filename, url, link)
            if not info.is_dir() and not is_link:
                self.names[safe] = info.filename

    def _open(self):
        if self._zip is None:
            fs, path = open_fs(self.url, "PATH")
            self._zip = zipfile.ZipFile(fs.open(path, "rb"))
        return self._zip

    def __getstate__(self):
        return {"url": self.url, "names": self.names, "_zip": None}

    def read(self, name: str) -> bytes:
        return self._open().read(self.names[name])


def _local_files(root: str) -> Iterator[tuple[str, int]]:
    """(path, size) of every non-directory under a local ``root``, as fsspec's find lists them (links to
    folders are walked, a link's size is its target's, 0 if broken), without its per-file info dicts:
    ~150 bytes per file instead of ~800, which is prep's peak memory on a million-image folder."""
    stack = [root]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                path = posixpath.join(folder, entry.name)
                if entry.is_dir():
                    stack.append(path)
                    continue
                try:
                    size = entry.stat().st_size
                except OSError:
                    size = 0
                yield path, size


class FolderTree:
    """Files under a folder on any fsspec URL, by relative name; local links out of the folder are left out."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = open_fs(url, "PATH")
        local = is_local(self.fs)
        real_root = os.path.realpath(self.root) if local else None
        self.names: dict[str, int] = {}  # relative name -> size
        self.outside: list[str] = []
        listing = (
            _local_files(self.root)
            if local
            else ((p, int(info.get("size") or 0)) for p, info in self.fs.find(self.root, detail=True).items())
        )
        for p, size in sorted(listing):
            rel = posixpath.relpath(p, self.root)
            if local and not (os.path.realpath(p) + os.sep).startswith(real_root + os.sep):
                self.outside.append(rel)
                continue
            self.names[rel] = size

    def __getstate__(self):
        return {"url": self.url, "fs": self.fs, "root": self.root, "names": self.names, "outside": self.outside}

    def read(self, name: str) -> bytes:
        return self.fs.cat_file(posixpath.join(self.root, name))

    def path(self, name: str) -> str:
        return posixpath.join(self.root, name)


def is_local(fs) -> bool:
    """Whether an fsspec filesystem is the local disk."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def signature(url: str) -> dict:
    """What identifies a source's content cheaply: the URL plus size and modification time, or a listing digest."""
    fs, path = open_fs(url, "PATH")
    try:
        if fs.isdir(path):
            listing = sorted((posixpath.relpath(p, path), i.get("size")) for p, i in fs.find(path, detail=True).items())
            return {"url": url, "files": len(listing), "listing": hashlib.sha256(repr(listing).encode()).hexdigest()}
        info = fs.info(path)
    except Exception as e:  # noqa: BLE001 -- fsspec backends raise their own types: one line
        raise HardnegError(f"cannot read '{url}': {type(e).__name__}: {e}") from None
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("updated")
    return {"url": url, "size": info.get("size"), "mtime": str(mtime) if mtime is not None else None}


def cache_root() -> str:
    """Local cache for spooled archive members and remote FFCV files: $HARDNEG_CACHE_DIR or ~/.cache/hardneg."""
    return os.environ.get("HARDNEG_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "hardneg")
