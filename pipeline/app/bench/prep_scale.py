"""`hardneg bench prep --scale`: prep and reading cost at growing dataset sizes (time per image, peak RSS).

One synthetic JPEG imagefolder grows through ``--sizes`` (each image a function of its index, so the
10k images of the first size are the first 10k of the next). At each size a fresh process runs
``hardneg prep imagefolder:... --workers W`` and another reads two-view batches (augment.where=batch,
``--workers`` loader workers): one epoch, or ``--read-images`` images (streaming: the cost per image
does not depend on n). Each reports its wall time and the peak RSS of its main process and of its
largest worker (getrusage). Fits: prep time = a + b n, and the log-log exponent of prep time in n.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np


def _child(task: str, args: dict) -> None:
    """Run in a fresh process: prep or read once; print {"seconds", "main_mb", "worker_mb"} as JSON."""
    import resource

    start = time.perf_counter()
    if task == "prep":
        from data_prep.prep import prepare

        prepare(f"imagefolder:{args['folder']}", args["out"], workers=args["workers"])
    else:
        from pipeline import data
        from pipeline.config import AugmentConfig

        cfg = AugmentConfig(image_size=args["image_size"])
        batches = data.batched_train_batches(
            args["out"], "train", cfg, args["batch"], rank=0, seed=0, loader_workers=args["workers"]
        )
        for _ in range(max(args["n"] // args["batch"], 1)):
            next(batches)
        batches.close()  # joins the loader workers, so their peak RSS is counted below
    seconds = time.perf_counter() - start
    peak = {
        who: resource.getrusage(kind).ru_maxrss / 1024
        for who, kind in (("main_mb", resource.RUSAGE_SELF), ("worker_mb", resource.RUSAGE_CHILDREN))
    }
    print(json.dumps({"seconds": seconds, **peak}))


def _measure(task: str, args: dict) -> dict:
    code = (
        f"import json, sys; from pipeline.app.bench.prep_scale import _child; _child({task!r}, json.loads(sys.argv[1]))"
    )
    done = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{task} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fit_exponent(sizes: list[int], seconds: list[float]) -> float:
    """b in time ~ n^b (least squares on log-log); 1.0 is linear."""
    return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


def fit_linear(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """(a seconds, b seconds per image) of time = a + b n (least squares): a is the fixed start-up cost."""
    b, a = np.polyfit(np.asarray(sizes, dtype=float), np.asarray(seconds, dtype=float), 1)
    return float(a), float(b)


def run_scale(args) -> int:
    """Prep + read at each size; print the table and the fits."""
    from data_prep import synthetic

    sizes = sorted(int(s) for s in str(args.sizes).split(","))
    if args.quick:
        sizes = [300, 600]
    kind = "ImageNet-like JPEGs (300-500 x 250-450 px)" if args.imagenet else "32x32 JPEGs"
    image_size = 224 if args.imagenet else 32
    print(
        f"hardneg bench prep --scale: synthetic imagefolder of {kind}, {args.workers} workers, "
        f"reads of batch {args.batch} at {image_size}px (augment.where=batch)"
    )
    print(
        f"{'images':>8} | {'prep ms/img':>11} | {'prep peak RSS MB main / worker':>30} | {'read ms/img':>11} | "
        f"{'read peak RSS MB main / worker':>30}"
    )
    rows, have = [], 0
    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        folder = os.path.join(work, "images")
        for n in sizes:
            synthetic.write_jpeg_folder(folder, n, start=have, imagenet=args.imagenet)
            have = n
            out = os.path.join(work, f"wds-{n}")
            prep = _measure("prep", {"folder": folder, "out": out, "workers": args.workers})
            reads = min(args.read_images, n) if args.read_images > 0 else n
            read = _measure(
                "read", {"out": out, "workers": args.workers, "batch": args.batch, "n": reads, "image_size": image_size}
            )
            read["per_image"] = read["seconds"] / max(reads // args.batch, 1) / args.batch
            rows.append((n, prep, read))
            print(
                f"{n:8d} | {1000 * prep['seconds'] / n:11.3f} | {prep['main_mb']:14.0f} / "
                f"{prep['worker_mb']:13.0f} | {1000 * read['per_image']:11.3f} | {read['main_mb']:14.0f} / "
                f"{read['worker_mb']:13.0f}",
                flush=True,
            )
            shutil.rmtree(out, ignore_errors=True)
    ns = [r[0] for r in rows]
    prep_b = fit_exponent(ns, [r[1]["seconds"] for r in rows])
    pa, pb = fit_linear(ns, [r[1]["seconds"] for r in rows])
    reads = [1000 * r[2]["per_image"] for r in rows]
    grow = rows[-1][1]["main_mb"] - rows[0][1]["main_mb"]
    per_image = grow * 2**20 / max(ns[-1] - ns[0], 1)
    print(
        f"fit: prep time = {pa:.1f} s {'-' if pb < 0 else '+'} {1000 * abs(pb):.3f} ms x n (start-up + per image; log-log exponent "
        f"{prep_b:.2f}, 1.00 = linear); read {min(reads):.3f}-{max(reads):.3f} ms per image at every size; "
        f"prep peak RSS {rows[0][1]['main_mb']:.0f} -> {rows[-1][1]['main_mb']:.0f} MB from {ns[0]} to {ns[-1]} "
        f"images ({per_image:.0f} bytes per extra image; the file listing is on disk, the one per-image array kept is "
        f"the shard plan's permutation, 8 bytes per image)"
    )
    return 0
