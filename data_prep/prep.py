"""Prepare a dataset: open the source, plan shards, write them (in parallel), then the manifest last.

Parallelism is a thin map over jobs (``mapper(fn, source, jobs)`` yields results in any order; the
source reaches each worker once): in-process, a local process pool (``workers``), or Ray tasks
(cluster/prep.py passes its own mapper).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import uuid
from typing import Iterator, Optional

import numpy as np

from data_prep import sources
from data_prep.errors import HardnegError
from data_prep.holdout import HoldoutSource, with_holdout, with_test
from data_prep.jobs import (
    PROGRESS_DIR,
    ShardJob,
    intact,
    load_chunk,
    marker_url,
    read_marker,
    run_shard_job,
    write_marker,
)
from data_prep.manifest import build_manifest, join_url, out_fs, write_manifest
from data_prep.parallel import Mapper, local_mapper, ordered_chunks
from data_prep.plan import plan_shards
from data_prep.schema import MANIFEST_NAME, MANIFEST_VERSION, ffcv_name, shard_name
from data_prep.wds import IMAGE_FORMATS, encode_shard

FORMAT = "wds"
FORMATS = ("wds", "ffcv", "both")
PREP_VERSION = 2  # bump when the bytes written for the same inputs change
_TEMP = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$")


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
            except Exception:  # noqa: BLE001 -- object stores may have no directories to remove
                pass
    except HardnegError:
        raise
    except Exception as e:  # noqa: BLE001 -- OSError locally; botocore/gcsfs errors (credentials, no bucket) on object stores
        raise HardnegError(f"cannot write to OUT '{out}': {type(e).__name__}: {e}") from None


def _old_manifest(fs, root: str) -> Optional[dict]:
    try:
        with fs.open(posixpath.join(root, MANIFEST_NAME), "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):  # none, unreadable or not JSON: as if there were no earlier run
        return None


def _old_files(old: Optional[dict]) -> set[str]:
    """File names listed by a previous manifest (empty if there is none or it is unreadable)."""
    try:
        paths = {s["path"] for split in old["splits"].values() for s in split["shards"]}
        paths |= {split["ffcv"]["path"] for split in old["splits"].values() if split.get("ffcv")}
    except (AttributeError, KeyError, TypeError):  # no manifest (None), or one of another shape
        return set()
    # Only plain shard / FFCV names in OUT itself are ever deleted, whatever a stale manifest says.
    return {p for p in paths if isinstance(p, str) and "/" not in p and p.endswith((".tar", ".beton")) and p[:1] != "."}


def _prep_section(settings: dict, format: str, strict: bool, cap, fingerprint: str) -> dict:
    """The manifest's ``prep`` section: what the bytes written depend on (how many workers wrote them is a fact of
    the run, kept in prep_run.json: the same bytes either way)."""
    return dict(settings, format=format, strict=strict, shard_bytes=cap, fingerprint=fingerprint)


def _nothing_to_do(old: dict, source: str, out: str, prep: dict) -> bool:
    """Whether ``old`` (the manifest in OUT) is what this command would write and every file it lists is intact."""
    try:
        if old.get("version") != MANIFEST_VERSION or old.get("dataset") != source or old.get("prep") != prep:
            return False
        if prep["strict"] and old.get("skipped"):
            return False  # --strict now: the skipped inputs must fail the run
        files = [f for split in old["splits"].values() for f in [*split["shards"], split.get("ffcv")] if f]
        return all(intact(join_url(out, f["path"]), f) for f in files)
    except (AttributeError, KeyError, TypeError):  # a manifest of another shape: rewrite
        return False


def parse_bytes(text) -> int:
    """``64MB``, ``1.5GiB``, ``1000000`` -> bytes; HardnegError otherwise."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in units or float(m.group(1)) * units[m.group(2).upper()] < 1:
        raise HardnegError(f"shard_bytes={text!r}; expected a size like 64MB, 1GiB or a number of bytes")
    return int(float(m.group(1)) * units[m.group(2).upper()])


def estimate_shard_size(source: sources.Source, shard_bytes: int, seed: int, image_format: str) -> int:
    """Samples per shard for about ``shard_bytes``: the mean encoded size of the first 64 planned
    records of the largest split (deterministic), with 5% headroom. A target, not a hard cap."""
    split = max(source.sizes, key=lambda s: source.sizes[s])
    order = plan_shards({split: source.sizes[split]}, max(source.sizes[split], 1), seed)[0].records
    records = [r for r in source.load(split, order[:64]) if not isinstance(r, dict)]
    if not records:
        return 512
    per_sample = len(encode_shard(records, image_format)) / len(records)
    return max(1, int(shard_bytes * 0.95 / per_sample))


def fingerprint_of(source: sources.Source, settings: dict) -> str:
    """What the written bytes depend on: the source, its content signature and the plan settings."""
    key = {
        "version": PREP_VERSION,
        "source": source.spec,
        "signature": source.signature(),
        "sizes": source.sizes,
        **settings,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _remove_temps(fs, root: str) -> None:
    """Temp files a killed run left in OUT (``.NAME.tmp-<32 hex>``)."""
    try:
        for path in fs.ls(root, detail=False):
            if _TEMP.match(posixpath.basename(path.rstrip("/"))):
                fs.rm(path)
    except Exception:  # noqa: BLE001 -- best effort: a temp file left behind is harmless, and the next run removes it
        pass


def _bar(progress: bool, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit="img", unit_scale=True, smoothing=0.1, disable=not progress, dynamic_ncols=True
    )


def _previous(old: Optional[dict], fingerprint: str, split: str, name: str, positions) -> Optional[dict]:
    """{"entry", "skipped"} of file ``name`` in the previous manifest if it had the same fingerprint."""
    if not old or old.get("prep", {}).get("fingerprint") != fingerprint:
        return None
    info = old.get("splits", {}).get(split, {})
    entries = [s for s in info.get("shards", []) if s.get("path") == name]
    if info.get("ffcv", {}) and info["ffcv"].get("path") == name:
        entries = [info["ffcv"]]
    if not entries:
        return None
    listed = [s for s in old.get("skipped", []) if s.get("split") == split and isinstance(s.get("index"), int)]
    wanted = np.isin([s["index"] for s in listed], positions) if listed else []  # no per-record set
    skipped = [s for s, keep in zip(listed, wanted, strict=True) if keep]
    return {"entry": entries[0], "skipped": skipped}


def _write_ffcv(
    source,
    split: str,
    positions: np.ndarray,
    out: str,
    *,
    image_format: str,
    strict: bool,
    fingerprint: str,
    previous: Optional[dict],
    workers: int,
    bar,
) -> dict:
    """The FFCV file of one split, reused when already done; decoded by ``workers`` processes."""
    from data_prep import ffcv

    name = ffcv_name(split)
    url = join_url(out, name)
    marker = marker_url(out, fingerprint, name)
    done = previous or read_marker(marker)
    if done and done.get("entry") and not (strict and done.get("skipped")) and intact(url, done["entry"]):
        bar.update(len(positions))
        return dict(done, reused=True)
    chunks = [positions[i : i + 256] for i in range(0, len(positions), 256)]

    def items() -> Iterator:
        for chunk in ordered_chunks(load_chunk, source, [(split, c, strict) for c in chunks], workers):
            yield from chunk
            bar.update(len(chunk))

    page = ffcv.PAGE_SIZE if source.decodes_files else ffcv.SMALL_PAGE_SIZE
    result = ffcv.write_split(items(), len(positions), url, image_format, page)
    if result["entry"] is not None:
        write_marker(marker, {"entry": result["entry"], "skipped": result["skipped"]})
    return dict(result, reused=False)


def prepare(
    source: str,
    out: str,
    *,
    shard_size: int = 512,
    seed: int = 0,
    test_size: int = 300,
    progress: bool = False,
    format: str = "wds",
    workers: int = 1,
    strict: bool = False,
    shard_bytes=None,
    image_format: str = "auto",
    mapper: Optional[Mapper] = None,
    val_fraction: Optional[float] = None,
    test_fraction: Optional[float] = None,
    status: Optional[dict] = None,
) -> dict:
    """Shard ``source`` into ``out`` (path or fsspec URL) and return the manifest; reruns write nothing
    (``status``, when given, gets "wrote": False then, True when anything was written).

    ``format``: wds | ffcv | both. ``shard_bytes`` (e.g. "64MB") sets the shard size from the data.
    ``mapper`` runs the shard jobs (default: ``workers`` local processes). ``val_fraction``: the share of
    train held out, per class, as the ``holdout`` split (None: 0.1 for builtin:digits, else 0)."""
    if format not in FORMATS:
        raise HardnegError(f"format={format!r}; expected one of: {', '.join(FORMATS)}")
    if image_format not in IMAGE_FORMATS:
        raise HardnegError(f"image_format={image_format!r}; expected one of: {', '.join(IMAGE_FORMATS)}")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise HardnegError(f"workers={workers!r}; expected an integer >= 1")
    cap = parse_bytes(shard_bytes) if shard_bytes is not None else None
    if not isinstance(shard_size, (int, np.integer)) or isinstance(shard_size, bool) or shard_size < 1:
        raise HardnegError(
            f"shard_size={shard_size!r} (--shard-size): a shard holds at least 1 sample; expected an integer >= 1"
        )
    sources.check_spec(source)
    plan_shards({}, shard_size, seed)  # checks seed before any work
    if format != "wds":
        from data_prep import ffcv

        ffcv.require()
    check_writable(out)
    if workers > 1 and mapper is None and (out.startswith("memory:") or source.split(":", 1)[-1].startswith("memory:")):
        raise HardnegError(
            "--workers > 1 needs storage every worker process can reach; memory:// is private to one process"
        )
    # --test-fraction first: the test images leave train before the holdout is drawn from what remains
    src = with_holdout(with_test(sources.open_source(source, test_size=test_size), test_fraction), val_fraction)
    if cap is not None:
        shard_size = estimate_shard_size(src, cap, seed, image_format)
    specs = plan_shards(src.sizes, shard_size, seed)
    settings = {
        "shard_size": int(shard_size),
        "seed": int(seed),
        "test_size": int(test_size),
        "image_format": image_format,
    }
    if isinstance(src, HoldoutSource):  # recorded in the manifest's prep section (and the fingerprint)
        settings |= src.settings()
    fingerprint = fingerprint_of(src, settings)

    fs, root = out_fs(out)
    existed = fs.exists(root)
    fs.makedirs(root, exist_ok=True)
    old = _old_manifest(fs, root)
    stale = _old_files(old)
    _remove_temps(fs, root)
    if old is not None and _nothing_to_do(old, source, out, _prep_section(settings, format, strict, cap, fingerprint)):
        if status is not None:
            status["wrote"] = False
        return old  # the same command ran to its end before: not one byte is written
    # Without a manifest nothing is "done": a failure below leaves no manifest pointing at a mix.
    if fs.exists(posixpath.join(root, MANIFEST_NAME)):
        fs.rm(posixpath.join(root, MANIFEST_NAME))

    try:
        manifest = _write_all(
            source,
            src,
            specs,
            out,
            old,
            fingerprint,
            settings,
            format=format,
            workers=workers,
            strict=strict,
            progress=progress,
            cap=cap,
            mapper=mapper,
        )
    except BaseException:
        if not existed:  # nothing finished: leave no OUT behind (finished files stay, to resume from)
            _clean_failed(fs, root, existed, fingerprint, only_if_empty=True)
        raise
    if sum(v["num_samples"] for v in manifest["splits"].values()) == 0:
        _clean_failed(fs, root, existed, fingerprint)
        raise HardnegError(f"{source} has no readable images ({len(manifest['skipped'])} skipped)")
    write_manifest(out, manifest, {"workers": workers})
    if status is not None:
        status["wrote"] = True
    try:
        fs.rm(posixpath.join(root, PROGRESS_DIR), recursive=True)
    except Exception:  # noqa: BLE001 -- object stores may report a missing prefix
        pass

    # Files of an earlier run that this manifest no longer lists.
    listed = {s["path"] for v in manifest["splits"].values() for s in v["shards"]}
    listed |= {v["ffcv"]["path"] for v in manifest["splits"].values() if v.get("ffcv")}
    for path in sorted(stale - listed):
        if fs.isfile(posixpath.join(root, path)):
            fs.rm(posixpath.join(root, path))
    return manifest


def _write_all(
    source: str,
    src,
    specs,
    out: str,
    old,
    fingerprint: str,
    settings: dict,
    *,
    format: str,
    workers: int,
    strict: bool,
    progress: bool,
    cap,
    mapper,
) -> dict:
    """Run the shard jobs and the FFCV files; the manifest they make (not written yet)."""
    image_format = settings["image_format"]
    results: list[dict] = []
    total = sum(len(spec.records) for spec in specs)
    if format in ("wds", "both"):
        jobs = [
            ShardJob(
                spec.split,
                spec.index,
                spec.records,
                out,
                image_format,
                strict,
                fingerprint,
                _previous(old, fingerprint, spec.split, shard_name(spec.split, spec.index), spec.records),
            )
            for spec in specs
        ]
        with _bar(progress, total, f"shards -> {out}") as bar:
            for result in (mapper or local_mapper(workers))(run_shard_job, src, jobs):
                results.append(result)
                bar.update(result["inputs"])
    betons: dict[str, dict] = {}
    if format in ("ffcv", "both"):
        with _bar(progress, total, f"ffcv -> {out}") as bar:
            for split in src.sizes:
                parts = [spec.records for spec in specs if spec.split == split]
                positions = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
                if len(positions):
                    betons[split] = _write_ffcv(
                        src,
                        split,
                        positions,
                        out,
                        image_format=image_format,
                        strict=strict,
                        fingerprint=fingerprint,
                        previous=_previous(old, fingerprint, split, ffcv_name(split), positions),
                        workers=workers,
                        bar=bar,
                    )

    return _assemble(source, src, results, betons, format, settings, fingerprint, cap, strict)


def _clean_failed(fs, root: str, existed: bool, fingerprint: str, only_if_empty: bool = False) -> None:
    """Leave OUT as it was before a run that produced nothing."""
    try:
        if only_if_empty and any(
            not posixpath.basename(p.rstrip("/")).startswith(".") for p in fs.ls(root, detail=False)
        ):
            return
        if not existed:
            fs.rm(root, recursive=True)
        else:
            fs.rm(posixpath.join(root, PROGRESS_DIR), recursive=True)
    except Exception:  # noqa: BLE001 -- best effort while another error is on its way to the user: it must not mask that one
        pass


def _assemble(
    spec: str,
    src,
    results: list,
    betons: dict,
    format: str,
    settings: dict,
    fingerprint: str,
    cap,
    strict: bool,
) -> dict:
    """The manifest from the jobs' results: counts, shard and FFCV entries, skipped inputs, image size."""
    skipped = {(s["split"], s["index"], s["file"]): s for s in src.skipped}
    sizes, splits = [], {}
    for split in src.sizes:
        done = sorted((r for r in results if r["split"] == split), key=lambda r: r["index"])
        shards = [r["entry"] for r in done if r["entry"] is not None]
        info = {"num_samples": sum(s["num_samples"] for s in shards), "classes": list(src.classes), "shards": shards}
        for r in done + ([betons[split]] if split in betons else []):
            skipped.update({(s["split"], s["index"], s["file"]): s for s in r["skipped"]})
        sizes += [s.get("image_size") for s in shards]
        if split in betons and betons[split]["entry"] is not None:
            entry = betons[split]["entry"]
            if format == "both" and entry["num_samples"] != info["num_samples"]:
                raise HardnegError(
                    f"split '{split}': the FFCV file holds {entry['num_samples']} samples but the "
                    f"shards {info['num_samples']}; the source changed while it was read"
                )
            info["num_samples"] = entry["num_samples"]
            info["ffcv"] = entry
            sizes.append(entry.get("image_size"))
        splits[split] = info
    uniform = {tuple(s) if s else None for s in sizes}
    size = uniform.pop() if len(uniform) == 1 else None
    image = {"height": size[0] if size else None, "width": size[1] if size else None, "channels": 3}
    prep = _prep_section(settings, format, strict, cap, fingerprint)
    ordered = sorted(skipped.values(), key=lambda s: (s["split"], s["index"], s["file"] or ""))
    manifest = build_manifest(spec, prep, splits, image, ordered)
    manifest["info"] = dict(src.info)
    return manifest
