"""One unit of prep work, runnable anywhere (in-process, a worker process, a Ray task): write one shard.

A job first checks whether its shard is already done -- listed, with the same plan fingerprint, by the
previous manifest or by a progress marker that is written right after the shard's rename -- and the
file there still has that size (and sha256, on a local disk). Only then is it skipped, so a rerun after
a kill rewrites nothing finished and ends with the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Optional, Sequence

import fsspec

from data_prep.archive import is_local
from data_prep.atomic import put_atomic
from data_prep.errors import HardnegError
from data_prep.manifest import join_url
from data_prep.schema import shard_name
from data_prep.sources import Record, Source
from data_prep.wds import file_sha256, write_shard

PROGRESS_DIR = ".hardneg-progress"


def marker_url(out: str, fingerprint: str, name: str) -> str:
    """Where the progress marker of file ``name`` goes for a plan ``fingerprint``."""
    return join_url(out, f"{PROGRESS_DIR}/{fingerprint[:16]}/{name}.json")


def read_marker(url: str) -> Optional[dict]:
    """A progress marker's content, or None if there is none (or it is unreadable)."""
    try:
        with fsspec.open(url, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):  # missing, unreadable, or not JSON (a write cut short): the file is redone
        return None


def write_marker(url: str, done: dict) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    put_atomic(fs, path, json.dumps(done).encode("utf-8"))


def intact(url: str, entry: dict) -> bool:
    """Whether the file at ``url`` is the one ``entry`` describes (size always, sha256 when local)."""
    try:
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.isfile(path) or fs.size(path) != entry["bytes"]:
            return False
        return not is_local(fs) or file_sha256(fs, path) == entry["sha256"]
    except (OSError, ValueError, KeyError, TypeError):  # unreadable, or an entry of another shape: not intact
        return False


def uniform_size(records: list) -> Optional[list]:
    """[h, w] shared by all records, else None."""
    sizes = {r.image.shape[:2] for r in records}
    return [int(v) for v in sizes.pop()] if len(sizes) == 1 else None


def collect(items, strict: bool) -> tuple[list[Record], list[dict]]:
    """Split loaded items into records and skip entries; HardnegError on the first skip when strict."""
    records, skipped = [], []
    for item in items:
        if isinstance(item, dict):
            if strict:
                raise HardnegError(
                    f"cannot use {item['file'] or item['index']} ({item['error']}); "
                    f"drop --strict to skip and list such inputs instead"
                )
            skipped.append(item)
        else:
            records.append(item)
    return records, skipped


def load_chunk(source: Source, chunk: tuple) -> list:
    """Records and skip entries of chunk = (split, positions, strict), in order (the FFCV pass decodes in chunks)."""
    split, positions, strict = chunk
    items = list(source.load(split, positions))
    collect(items, strict)
    return items


@dataclass(frozen=True, eq=False)
class ShardJob:
    """Write shard ``index`` of ``split``: the source's records at ``positions`` (an array), in that order."""

    split: str
    index: int
    positions: Sequence[int]
    out: str
    image_format: str
    strict: bool
    fingerprint: str
    previous: Optional[dict] = None  # {"entry", "skipped"} from the previous manifest, same fingerprint

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)


def run_shard_job(source: Source, job: ShardJob) -> dict:
    """Do one ShardJob: {"split", "index", "entry" (None if every input was skipped), "skipped", "reused"}."""
    url = join_url(job.out, job.name)
    marker = marker_url(job.out, job.fingerprint, job.name)
    done = job.previous or read_marker(marker)
    result = {"split": job.split, "index": job.index, "inputs": len(job.positions)}
    if done and done.get("entry") and not (job.strict and done.get("skipped")) and intact(url, done["entry"]):
        return dict(result, entry=done["entry"], skipped=done.get("skipped", []), reused=True)
    records, skipped = collect(source.load(job.split, job.positions), job.strict)
    if not records:
        return dict(result, entry=None, skipped=skipped, reused=False)
    entry = write_shard(records, url, job.image_format)
    entry["image_size"] = uniform_size(records)
    write_marker(marker, {"entry": entry, "skipped": skipped})
    return dict(result, entry=entry, skipped=skipped, reused=False)
