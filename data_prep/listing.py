"""An imagefolder's file listing kept on local disk (SQLite), so prep's memory does not grow with the files.

The folder walk (local: ``os.scandir``; any other fsspec URL: ``fs.walk`` one directory at a time) streams
into a SQLite file under ``cache_root()/listings``; SQL sorts it (names as UTF-8 bytes, which order like
Python strings) and numbers each split's files in the reader's order, by (class, name). ``entry(split, i)``
is then a primary-key lookup. The listing digest is the sha256 of ``repr(sorted({name: size}.items()))``,
streamed one item at a time -- the value prepared outputs were fingerprinted with before the listing moved
to disk.

A listing pickles small (its file path and digest): a process that inherits or unpickles it opens its own
read-only connection (forked workers never use the parent's); one where the file does not exist (a Ray
worker on another node) lists the folder again and checks the digest, so a folder changed meanwhile is
an error instead of mismatched labels. Each file is removed when the object that built it is collected
or its process exits; files a killed process left behind (``PID-UUID-HOST.sqlite``) are swept by the next
listing built on that host.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import socket
import sqlite3
import uuid
import weakref
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from data_prep.archive import _local_files, cache_root, is_local, open_fs
from data_prep.atomic import atomic_path
from data_prep.errors import HardnegError

# rel -> the (split, class) pairs a file belongs to (a picklable, module-level function or partial)
Classify = Callable[[str], Iterable[tuple[str, str]]]
_BATCH = 4096
_NAME = re.compile(r"^\.?(\d+)-[0-9a-f]{32}-(.+?)\.sqlite(?:\..*)?$")  # PID-UUID-HOST.sqlite, its temps
_INHERITED: list = []  # connections opened before a fork: kept, never used or closed, in the child


def _b(text: str) -> bytes:
    """A name as bytes that sort like the str (UTF-8; surrogate-escaped undecodable names kept)."""
    return text.encode("utf-8", "surrogatepass")


def _s(data: bytes) -> str:
    return data.decode("utf-8", "surrogatepass")


def walk_files(fs, root: str) -> Iterator[tuple[str, int]]:
    """(path, size) of every file under ``root``, one directory at a time (local links to folders followed)."""
    if is_local(fs):
        yield from _local_files(root)
        return
    for _, _, files in fs.walk(root, detail=True):
        for info in files.values():
            yield info["name"], int(info.get("size") or 0)


def _remove(path: str, owner: int) -> None:
    """Remove a listing file, only in the process that built it (a forked child's copy of the object must not)."""
    if os.getpid() == owner:
        try:
            os.remove(path)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep(folder: str) -> None:
    """Remove the listings (and their temp files) that processes of this host left when killed."""
    host = socket.gethostname()
    for name in os.listdir(folder):
        m = _NAME.match(name)
        if m and m.group(2) == host and not _alive(int(m.group(1))):
            _remove(os.path.join(folder, name), os.getpid())


class FolderListing:
    """The files under a folder URL, each split's numbered in (class, name) order, in a local SQLite file."""

    def __init__(self, url: str, classify: Classify, splits: list[str]):
        self.url, self.classify, self.splits = url, classify, list(splits)
        self.fs, self.root = open_fs(url, "PATH")
        folder = os.path.join(os.path.abspath(cache_root()), "listings")
        self.db = os.path.join(folder, f"{os.getpid()}-{uuid.uuid4().hex}-{socket.gethostname()}.sqlite")
        self._conn: Optional[sqlite3.Connection] = None
        self._pid = -1
        facts = self._build()
        self.count, self.digest, self.outside, self.classes, self.sizes = facts

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_conn=None, _pid=-1)
        return state

    def _build(
        self, expected: Optional[tuple[int, str]] = None
    ) -> tuple[int, str, list[str], list[str], dict[str, int]]:
        """Walk the folder into ``self.db`` (temp name, then rename): (files, digest, outside, classes, sizes).

        With ``expected`` (files, digest): HardnegError, and no file, if the folder no longer lists so."""
        scratch = f"{self.db}.scratch-{uuid.uuid4().hex}"  # the raw walk, dropped once sorted
        try:
            os.makedirs(os.path.dirname(self.db), exist_ok=True)
            sweep(os.path.dirname(self.db))
            with atomic_path(self.db) as tmp:
                conn = sqlite3.connect(tmp, isolation_level=None)
                try:
                    conn.execute("ATTACH DATABASE ? AS scratch", (scratch,))
                    facts = self._fill(conn)
                finally:
                    conn.close()
                    if os.path.exists(scratch):
                        os.remove(scratch)
                if expected is not None and facts[:2] != expected:
                    raise HardnegError(
                        f"imagefolder path '{self.url}' changed while it was read ({expected[0]} files listed "
                        f"at the start, {facts[0]} now); rerun prep once it is stable"
                    )
        except (OSError, sqlite3.Error) as e:
            msg = str(e).splitlines()[0] if str(e) else ""
            raise HardnegError(
                f"cannot list imagefolder path '{self.url}' into '{self.db}': {type(e).__name__}: {msg} "
                f"(set HARDNEG_CACHE_DIR to a writable local folder with room)"
            ) from None
        weakref.finalize(self, _remove, self.db, os.getpid())
        return facts

    def _fill(self, conn: sqlite3.Connection) -> tuple[int, str, list[str], list[str], dict[str, int]]:
        conn.execute("PRAGMA temp_store=FILE")  # SQL sorts spill to disk, not memory
        for schema in ("main", "scratch"):
            for pragma in ("journal_mode=OFF", "synchronous=OFF", "cache_size=-1024"):
                conn.execute(f"PRAGMA {schema}.{pragma}")
        conn.execute("BEGIN")
        conn.execute("CREATE TABLE scratch.files (rel BLOB PRIMARY KEY, size INTEGER, outside INTEGER) WITHOUT ROWID")
        local = is_local(self.fs)
        real_root = os.path.realpath(self.root) if local else None

        def rows() -> Iterator[tuple[bytes, int, int]]:
            for p, size in walk_files(self.fs, self.root):
                out = local and not (os.path.realpath(p) + os.sep).startswith(real_root + os.sep)
                yield _b(posixpath.relpath(p, self.root)), size, int(out)

        _insert(conn, "INSERT OR REPLACE INTO scratch.files VALUES (?, ?, ?)", rows())
        conn.execute("CREATE TABLE scratch.members (split INTEGER, cls BLOB, rel BLOB)")
        split_id = {s: i for i, s in enumerate(self.splits)}
        digest, count = hashlib.sha256(b"["), 0
        outside: list[str] = []

        def members() -> Iterator[tuple[int, bytes, bytes]]:
            nonlocal count
            for rel_b, size, out in conn.execute("SELECT rel, size, outside FROM scratch.files ORDER BY rel"):
                rel = _s(rel_b)
                if out:
                    outside.append(rel)
                    continue
                digest.update((", " if count else "").encode() + repr((rel, size)).encode())
                count += 1
                for split, cls in self.classify(rel):
                    yield split_id[split], _b(cls), rel_b

        _insert(conn, "INSERT INTO scratch.members VALUES (?, ?, ?)", members())
        digest.update(b"]")
        conn.execute("CREATE TABLE classes (cls BLOB PRIMARY KEY, label INTEGER) WITHOUT ROWID")
        conn.execute(
            "INSERT INTO classes SELECT cls, ROW_NUMBER() OVER (ORDER BY cls) - 1 FROM (SELECT DISTINCT cls FROM scratch.members)"
        )
        conn.execute(
            "CREATE TABLE entries (split INTEGER, pos INTEGER, label INTEGER, rel BLOB, PRIMARY KEY (split, pos))"
            " WITHOUT ROWID"
        )
        conn.execute(
            "INSERT INTO entries SELECT m.split, ROW_NUMBER() OVER (PARTITION BY m.split ORDER BY m.cls, m.rel) - 1,"
            " c.label, m.rel FROM scratch.members m JOIN classes c ON c.cls = m.cls"
        )
        classes = [_s(c) for (c,) in conn.execute("SELECT cls FROM classes ORDER BY label")]
        counts = dict(conn.execute("SELECT split, COUNT(*) FROM entries GROUP BY split").fetchall())
        conn.execute("COMMIT")
        sizes = {s: int(counts.get(i, 0)) for s, i in split_id.items()}
        return count, digest.hexdigest(), outside, classes, sizes

    def _connect(self) -> sqlite3.Connection:
        """This process's read-only connection; the listing rebuilt (and checked) first if its file is not here."""
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        if self._conn is not None:  # made before a fork: SQLite forbids using (or closing) it in the child
            _INHERITED.append(self._conn)
            self._conn = None
        if not os.path.exists(self.db):  # unpickled on another machine (or after the builder removed it)
            self._build(expected=(self.count, self.digest))
        uri = Path(self.db).as_uri() + "?mode=ro&immutable=1"
        self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        self._conn.execute("PRAGMA cache_size=-1024")  # 1 MB of pages: lookups are by key; the OS caches the file
        self._pid = os.getpid()
        return self._conn

    def entry(self, split: str, index: int) -> tuple[int, str]:
        """(label, relative name) of file ``index`` of ``split``."""
        row = (
            self._connect()
            .execute("SELECT label, rel FROM entries WHERE split = ? AND pos = ?", (self.splits.index(split), index))
            .fetchone()
        )
        if row is None:
            raise IndexError(f"{split} has no file {index}")
        return int(row[0]), _s(row[1])

    def names(self) -> Iterator[tuple[str, int, str]]:
        """(split, label, relative name) of every file, split by split, in order (streamed from disk)."""
        rows = self._connect().execute("SELECT split, label, rel FROM entries ORDER BY split, pos")
        for split, label, rel in rows:
            yield self.splits[split], int(label), _s(rel)

    def read(self, rel: str) -> bytes:
        """The bytes of file ``rel``."""
        return self.fs.cat_file(posixpath.join(self.root, rel))


def _insert(conn: sqlite3.Connection, sql: str, rows: Iterable[tuple]) -> None:
    """executemany in batches, so a generator over another query's cursor is never drained into a list."""
    batch: list[tuple] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= _BATCH:
            conn.executemany(sql, batch)
            batch = []
    if batch:
        conn.executemany(sql, batch)
