"""Prepare a dataset: read the source, plan shards, write them, then write the manifest last."""
from __future__ import annotations

import json
import posixpath
import uuid

from data_prep import sources
from data_prep.manifest import build_manifest, join_url, out_fs, write_manifest
from data_prep.plan import plan_shards
from data_prep.schema import MANIFEST_NAME, shard_name
from data_prep.wds import write_shard
from pipeline.errors import HardnegError

FORMAT = "wds"


def _missing_dirs(fs, root: str) -> list[str]:
    """``root`` and those of its ancestors that do not exist yet, deepest first."""
    missing, path = [], root
    while not fs.exists(path):
        missing.append(path)
        parent = posixpath.dirname(path)
        if parent == path or not parent:
            break
        path = parent
    return missing


def check_writable(out: str) -> None:
    """HardnegError unless a file can be created in ``out``; leaves nothing behind that was not there."""
    fs, root = out_fs(out)
    try:
        if fs.exists(root) and not fs.isdir(root):
            raise HardnegError(f"cannot write to OUT '{out}': it exists and is not a directory")
        created = _missing_dirs(fs, root)
        fs.makedirs(root, exist_ok=True)
        probe = posixpath.join(root, f".write-probe-{uuid.uuid4().hex}")
        with fs.open(probe, "wb") as f:
            f.write(b"")
        fs.rm(probe)
        for path in created:  # deepest first
            try:
                fs.rmdir(path)
            except Exception:  # object stores may have no directories to remove
                pass
    except HardnegError:
        raise
    except Exception as e:
        raise HardnegError(f"cannot write to OUT '{out}': {type(e).__name__}: {e}") from None


def image_info(dataset: sources.Dataset) -> dict:
    """Image height and width (None where they vary) and channels over all records."""
    shapes = {r.image.shape for records in dataset.splits.values() for r in records}
    heights = {s[0] for s in shapes}
    widths = {s[1] for s in shapes}
    return {
        "height": heights.pop() if len(heights) == 1 else None,
        "width": widths.pop() if len(widths) == 1 else None,
        "channels": 3,
    }


def _old_shards(fs, root: str) -> set[str]:
    """Shard names listed by a manifest already in OUT (empty if there is none or it is unreadable)."""
    try:
        with fs.open(posixpath.join(root, MANIFEST_NAME), "rb") as f:
            old = json.loads(f.read().decode("utf-8"))
        paths = {s["path"] for split in old["splits"].values() for s in split["shards"]}
    except Exception:
        return set()
    # Only plain shard names in OUT itself are ever deleted, whatever a stale manifest says.
    return {p for p in paths if isinstance(p, str) and "/" not in p and p.endswith(".tar") and p[:1] != "."}


def prepare(
    source: str,
    out: str,
    *,
    shard_size: int = 512,
    seed: int = 0,
    test_size: int = 300,
    progress: bool = False,
) -> dict:
    """Shard ``source`` into ``out`` (path or fsspec URL) and return the manifest; reruns rewrite nothing."""
    reader, arg = sources.resolve(source)
    plan_shards({}, shard_size, seed)  # checks shard_size and seed before any work
    check_writable(out)
    dataset = reader(arg, source, test_size)
    specs = plan_shards({s: len(r) for s, r in dataset.splits.items()}, shard_size, seed)

    fs, root = out_fs(out)
    fs.makedirs(root, exist_ok=True)
    stale = _old_shards(fs, root)
    # Without a manifest nothing is "done": a failure below leaves no manifest pointing at a mix.
    if fs.exists(posixpath.join(root, MANIFEST_NAME)):
        fs.rm(posixpath.join(root, MANIFEST_NAME))

    shards: dict[str, list[dict]] = {s: [] for s in dataset.splits}
    if progress:
        from tqdm import tqdm

        specs = tqdm(specs, desc=f"shards -> {out}", unit="shard")
    for spec in specs:
        records = dataset.splits[spec.split]
        url = join_url(out, shard_name(spec.split, spec.index))
        shards[spec.split].append(write_shard([records[i] for i in spec.records], url))

    splits = {
        name: {"num_samples": len(records), "classes": list(dataset.classes), "shards": shards[name]}
        for name, records in dataset.splits.items()
    }
    prep = {"shard_size": int(shard_size), "seed": int(seed), "test_size": int(test_size), "format": FORMAT}
    manifest = build_manifest(source, prep, splits, image_info(dataset), dataset.skipped)
    write_manifest(out, manifest)

    # Shards of an earlier run that this manifest no longer lists.
    for path in sorted(stale - {s["path"] for v in shards.values() for s in v}):
        if fs.isfile(posixpath.join(root, path)):
            fs.rm(posixpath.join(root, path))
    return manifest
