"""`hardneg bench prep`: conversion speed, and two-view read throughput against an in-memory baseline.

Builds a synthetic CIFAR-10 "python version" archive itself, shards it (WebDataset, FFCV) with
``--workers`` processes, then reads both back through the training loaders (two views, decode +
SimCLR augmentation, batches of ``--batch``) and compares with a torchvision-style in-memory dataset
(uint8 arrays -> PIL -> the same transform, DataLoader with the same worker count). WebDataset is read
twice: per sample (augment.where=loader) and batched (augment.where=batch: crops per sample to uint8,
colour steps per batch). ``--scale`` measures prep and reading at growing sizes instead (prep_scale.py).
Ratios only; never a timed test.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time

import numpy as np


class InMemory:
    """What torchvision's CIFAR10 does per item: array -> PIL -> transform; here -> two views + label."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, two_views):
        self.images, self.labels, self.two_views = images, labels, two_views

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        v1, v2 = self.two_views(Image.fromarray(self.images[i]))
        return v1, v2, int(self.labels[i])


def _rate(batches, n_batches: int, batch: int, warmup: int = 2) -> float:
    """Images/s over ``n_batches`` batches after ``warmup`` (worker start, FFCV's compilation)."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in itertools.islice(it, n_batches):
        pass
    return n_batches * batch / (time.perf_counter() - start)


def _baseline(source, two_views, batch: int, workers: int):
    import torch

    records = source.materialize().splits["train"]
    images = np.stack([r.image for r in records])
    labels = np.array([r.label for r in records])
    loader = torch.utils.data.DataLoader(
        InMemory(images, labels, two_views),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    return itertools.chain.from_iterable(itertools.repeat(loader))


def main(argv: list[str]) -> int:
    """Long on purpose: the argparse declarations, then one measured section after another, each printed as it ends."""
    p = argparse.ArgumentParser(prog="hardneg bench prep", description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10000, help="training images in the synthetic archive (default 10000)")
    p.add_argument("--workers", type=int, default=2, help="conversion processes and loader workers (default 2)")
    p.add_argument("--batch", type=int, default=256, help="batch size when reading (default 256)")
    p.add_argument("--batches", type=int, default=20, help="timed batches per reader (default 20)")
    p.add_argument("--quick", action="store_true", help="a tiny run (for tests): 600 images, batches of 64")
    p.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    p.add_argument(
        "--scale",
        action="store_true",
        help="instead: conversion and reading of synthetic JPEG folders at --sizes: time per image, peak RSS",
    )
    p.add_argument("--sizes", default="10000,40000,160000", help="--scale: dataset sizes (default 10000,40000,160000)")
    p.add_argument("--imagenet", action="store_true", help="--scale: ImageNet-like image sizes (default 32x32)")
    p.add_argument(
        "--read-images",
        type=int,
        default=0,
        help="--scale: images read at each size (default 0: one epoch, all of them)",
    )
    args = p.parse_args(argv)
    if args.scale:
        from pipeline.app.bench.prep_scale import run_scale

        return run_scale(args)
    if args.quick:
        args.images, args.batch, args.batches = 600, 64, 3
    import torch

    from data_prep import synthetic
    from data_prep.ffcv import unavailable
    from data_prep.prep import prepare
    from data_prep.sources import open_source
    from pipeline import augment, data
    from pipeline.config import AugmentConfig

    torch.set_num_threads(args.workers)  # the FFCV path's batched colour steps: the same cores
    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        archive = synthetic.write_cifar10(
            os.path.join(work, "cifar-10-python.tar.gz"), n_train=args.images, n_test=max(args.images // 10, 10)
        )
        spec = f"cifar10:{archive}"
        print(
            f"hardneg bench prep: synthetic CIFAR-10 archive, {args.images} train images, {args.workers} workers, "
            f"batch {args.batch}"
        )
        start = time.perf_counter()
        prepare(spec, os.path.join(work, "wds"), workers=args.workers)
        wds_rate = (args.images + max(args.images // 10, 10)) / (time.perf_counter() - start)
        print(f"conversion  WebDataset shards  {wds_rate:8.0f} img/s  ({wds_rate / args.workers:.0f} img/s per worker)")
        why = unavailable()
        if why is None:
            start = time.perf_counter()
            prepare(spec, os.path.join(work, "ffcv"), format="ffcv", workers=args.workers)
            ffcv_rate = (args.images + max(args.images // 10, 10)) / (time.perf_counter() - start)
            print(
                f"conversion  FFCV .beton        {ffcv_rate:8.0f} img/s  ({ffcv_rate / args.workers:.0f} img/s per "
                f"worker; one writer, {args.workers} decoders)"
            )
        else:
            print(f"conversion  FFCV .beton        unavailable ({why})")

        cfg = AugmentConfig()
        two_views = augment.TwoViews(augment.view_transform(cfg))
        rates = {
            "torchvision in-memory": _rate(
                _baseline(open_source(spec), two_views, args.batch, args.workers), args.batches, args.batch
            )
        }
        rates["WebDataset per sample"] = _rate(
            data.train_batches(
                os.path.join(work, "wds"), "train", two_views, args.batch, rank=0, seed=0, loader_workers=args.workers
            ),
            args.batches,
            args.batch,
        )
        rates["WebDataset batched"] = _rate(
            data.batched_train_batches(
                os.path.join(work, "wds"), "train", cfg, args.batch, rank=0, seed=0, loader_workers=args.workers
            ),
            args.batches,
            args.batch,
        )
        if why is None:
            rates["FFCV"] = _rate(
                data.ffcv_train_batches(
                    os.path.join(work, "ffcv"), "train", cfg, args.batch, rank=0, seed=0, loader_workers=args.workers
                ),
                args.batches,
                args.batch,
            )
        base = rates["torchvision in-memory"]
        goals = {"WebDataset batched": 1.2, "FFCV": 2.0}
        print(
            f"read        two views, decode + augment, {args.workers} workers, relative to torchvision in-memory "
            f"(WebDataset batched = augment.where=batch):"
        )
        for name, rate in rates.items():
            goal = (
                f"  (goal >= {goals[name]:.1f}x: {'met' if rate / base >= goals[name] else 'NOT met'})"
                if name in goals
                else ""
            )
            print(f"  {name:22s} {rate:8.0f} img/s  {rate / base:5.2f}x{goal}")
    return 0
