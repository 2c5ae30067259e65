"""The manifest beside the shards: build, write atomically, read, verify, and list shard URLs."""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
from datetime import datetime, timezone
from typing import Optional

import fsspec

from data_prep.atomic import put_atomic
from data_prep.errors import HardnegError
from data_prep.schema import IMAGE_KEY, IMAGE_KEYS, LABEL_KEY, MANIFEST_NAME, MANIFEST_VERSION, META_KEY

SAMPLE_PARTS = (IMAGE_KEY, LABEL_KEY, META_KEY)  # IMAGE_KEY or JPEG_KEY: one of schema.IMAGE_KEYS
_SHARD_FIELDS = {"path": str, "num_samples": int, "bytes": int, "sha256": str}


def out_fs(out: str):
    """(filesystem, root path) of an output location; HardnegError if fsspec cannot open it."""
    if not isinstance(out, str) or not out:
        raise HardnegError(f"OUT={out!r}; expected a path or an fsspec URL")
    try:
        fs, root = fsspec.core.url_to_fs(out)
    except Exception as e:  # noqa: BLE001 -- unknown protocol, missing driver (e.g. s3fs), bad URL
        raise HardnegError(f"cannot use OUT '{out}': {type(e).__name__}: {e}") from None
    return fs, root.rstrip("/") or "/"


def join_url(out: str, rel: str) -> str:
    """URL of ``rel`` inside ``out``: same protocol as ``out``, an absolute path when it is local."""
    if "://" in out or "::" in out:
        return f"{out.rstrip('/')}/{rel}"
    _, root = out_fs(out)
    return posixpath.join(root, rel)


RUN_NAME = "prep_run.json"  # facts of the prep run that wrote the manifest (time, workers): not in the manifest


def build_manifest(dataset: str, prep: dict, splits: dict, image: dict, skipped: list) -> dict:
    """The manifest dict (``splits``: name -> {num_samples, classes, shards}): a function of the inputs and the
    prep settings only, so the same command writes the same bytes (the run's time goes to RUN_NAME)."""
    return {
        "version": MANIFEST_VERSION,
        "dataset": dataset,
        "prep": dict(prep),
        "image": dict(image),
        "splits": splits,
        "skipped": list(skipped),
    }


def manifest_bytes(manifest: dict) -> bytes:
    """The bytes ``OUT/manifest.json`` holds for ``manifest``."""
    return (json.dumps(manifest, indent=1) + "\n").encode("utf-8")


def write_manifest(out: str, manifest: dict, run: Optional[dict] = None) -> None:
    """Write ``OUT/manifest.json`` atomically (temp name in the same directory, then rename), then ``run``'s
    facts (workers ...) with the time into ``OUT/prep_run.json``."""
    fs, root = out_fs(out)
    put_atomic(fs, posixpath.join(root, MANIFEST_NAME), manifest_bytes(manifest))
    facts = {"written": datetime.now(timezone.utc).isoformat(timespec="seconds"), **(run or {})}
    put_atomic(fs, posixpath.join(root, RUN_NAME), (json.dumps(facts, indent=1) + "\n").encode("utf-8"))


def _check_manifest(m, where: str) -> None:
    """Raise HardnegError naming the first thing wrong with a parsed manifest."""
    if not isinstance(m, dict):
        raise HardnegError(f"invalid manifest {where}: expected a JSON object")
    if m.get("version") != MANIFEST_VERSION:
        raise HardnegError(
            f"manifest {where} has version {m.get('version')!r}; this code reads version {MANIFEST_VERSION}"
        )
    splits = m.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise HardnegError(f"invalid manifest {where}: 'splits' must be a non-empty object")
    for name, split in splits.items():
        if not isinstance(split, dict) or not isinstance(split.get("shards"), list):
            raise HardnegError(f"invalid manifest {where}: split '{name}' needs a 'shards' list")
        if not isinstance(split.get("num_samples"), int) or not isinstance(split.get("classes"), list):
            raise HardnegError(f"invalid manifest {where}: split '{name}' needs 'num_samples' and 'classes'")
        files = [(f"shard {i}", shard) for i, shard in enumerate(split["shards"])]
        if "ffcv" in split:
            files.append(("ffcv", split["ffcv"]))
        for what, shard in files:
            for key, typ in _SHARD_FIELDS.items():
                if not isinstance(shard, dict) or not isinstance(shard.get(key), typ):
                    raise HardnegError(
                        f"invalid manifest {where}: split '{name}' {what} needs '{key}' ({typ.__name__})"
                    )
            path = shard["path"]
            if path.startswith("/") or ".." in path.split("/") or "://" in path:
                raise HardnegError(f"invalid manifest {where}: shard path '{path}' must be relative to it")


def read_manifest(out: str) -> dict:
    """Read and check ``OUT/manifest.json``; HardnegError if missing, unreadable, invalid or another version."""
    fs, root = out_fs(out)
    path = posixpath.join(root, MANIFEST_NAME)
    where = f"'{join_url(out, MANIFEST_NAME)}'"
    try:
        with fs.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise HardnegError(f"no manifest {where}; write one with `hardneg prep SOURCE {out}`") from None
    except Exception as e:  # noqa: BLE001 -- fsspec backends raise their own types: one line
        raise HardnegError(f"cannot read manifest {where}: {type(e).__name__}: {e}") from None
    try:
        m = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HardnegError(f"manifest {where} is not valid JSON: {e}") from None
    _check_manifest(m, where)
    return m


def shard_urls(out: str, manifest: dict, split: str) -> list[str]:
    """URLs of the shards of ``split`` (same protocol as ``out``); HardnegError naming the splits there are."""
    splits = manifest.get("splits", {})
    if split not in splits:
        raise HardnegError(f"unknown split '{split}'; available: {', '.join(splits) or 'none'}")
    return [join_url(out, shard["path"]) for shard in splits[split]["shards"]]


def count_samples(data: bytes) -> tuple[int, list[str]]:
    """(number of samples, problems) of tar bytes; a sample is the members sharing a key."""
    parts: dict[str, set] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = posixpath.basename(member.name)
            key, _, ext = base.partition(".")
            parts.setdefault(posixpath.join(posixpath.dirname(member.name), key), set()).add(ext)
    problems = []
    for key, exts in parts.items():
        lacks = sorted({LABEL_KEY, META_KEY} - exts) + ([] if exts & set(IMAGE_KEYS) else [IMAGE_KEY])
        if lacks:
            problems.append(f"sample '{key}' lacks {', '.join(lacks)}")
    return len(parts), problems


def _verify_ffcv(fs, root: str, entry: dict) -> list[str]:
    """Problems of one FFCV file: missing, size, sha256 (streamed), header sample count."""
    name = entry["path"]
    digest, size, head = hashlib.sha256(), 0, b""
    try:
        with fs.open(posixpath.join(root, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                if not head:
                    head = chunk[:4096]
                digest.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        return [f"{name}: missing"]
    except Exception as e:  # noqa: BLE001 -- verify lists every problem: a backend's error on one file is one of them
        return [f"{name}: unreadable ({type(e).__name__}: {e})"]
    problems = []
    if size != entry["bytes"]:
        problems.append(f"{name}: {size} bytes, manifest says {entry['bytes']}")
    if digest.hexdigest() != entry["sha256"]:
        problems.append(f"{name}: sha256 differs from the manifest")
    from data_prep import ffcv

    if ffcv.unavailable() is None:
        try:
            n = ffcv.header_samples(head)
        except ValueError as e:
            return problems + [f"{name}: not an FFCV file ({e})"]
        if n != entry["num_samples"]:
            problems.append(f"{name}: {n} samples, manifest says {entry['num_samples']}")
    return problems


def verify(out: str) -> list[str]:
    """Re-read every shard the manifest lists; the problems found (an empty list means all is well)."""
    manifest = read_manifest(out)
    fs, root = out_fs(out)
    problems = []
    for split, info in manifest["splits"].items():
        total = sum(shard["num_samples"] for shard in info["shards"])
        if (info["shards"] or "ffcv" not in info) and total != info["num_samples"]:
            problems.append(f"split '{split}': shards hold {total} samples, manifest says {info['num_samples']}")
        if "ffcv" in info:
            if info["ffcv"]["num_samples"] != info["num_samples"]:
                problems.append(
                    f"split '{split}': FFCV file holds {info['ffcv']['num_samples']} samples, "
                    f"manifest says {info['num_samples']}"
                )
            problems.extend(_verify_ffcv(fs, root, info["ffcv"]))
        for shard in info["shards"]:
            name = shard["path"]
            try:
                with fs.open(posixpath.join(root, name), "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                problems.append(f"{name}: missing")
                continue
            except Exception as e:  # noqa: BLE001 -- verify lists every problem: a backend's error on one file is one of them
                problems.append(f"{name}: unreadable ({type(e).__name__}: {e})")
                continue
            if len(data) != shard["bytes"]:
                problems.append(f"{name}: {len(data)} bytes, manifest says {shard['bytes']}")
            if hashlib.sha256(data).hexdigest() != shard["sha256"]:
                problems.append(f"{name}: sha256 differs from the manifest")
            try:
                n, bad = count_samples(data)
            except (tarfile.TarError, EOFError, OSError) as e:
                problems.append(f"{name}: not a readable tar ({type(e).__name__}: {e})")
                continue
            problems.extend(f"{name}: {p}" for p in bad)
            if n != shard["num_samples"]:
                problems.append(f"{name}: {n} samples, manifest says {shard['num_samples']}")
    return problems
