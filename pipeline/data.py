"""Loaders over prepared shards: the only reader of WebDataset in the project.

Training reads *resampled* shards (WebDataset's ResampledShards) so every rank yields full batches
forever and an "epoch" is a fixed number of steps derived from the manifest (OpenCLIP's loader):
every rank runs the same number of steps, so DDP never hangs on a short rank. Evaluation reads a
split once, in manifest order. Shards are opened through fsspec, so any URL works.
"""
from __future__ import annotations

import io
import random
from functools import partial
from typing import Callable, Iterator

import fsspec
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_prep import schema
from data_prep.manifest import read_manifest, shard_urls
from pipeline.errors import HardnegError


def _open_streams(urls: Iterator[dict]) -> Iterator[dict]:
    """Pipeline stage: {"url"} -> {"url", "stream"} opened with fsspec (WebDataset has no s3:// opener)."""
    for item in urls:
        url = item["url"]
        try:
            with fsspec.open(url, "rb") as stream:
                yield {"url": url, "stream": stream}
        except FileNotFoundError:
            raise HardnegError(f"shard listed in the manifest is missing: {url}") from None


def _decode_rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _samples(stream: Iterator[dict]) -> Iterator[tuple[Image.Image, int]]:
    """Pipeline stage: raw tar members -> (PIL RGB image, label)."""
    for sample in stream:
        yield _decode_rgb(sample[schema.IMAGE_KEY]), int(sample[schema.LABEL_KEY])


def steps_per_epoch(manifest: dict, split: str, global_batch_size: int) -> int:
    """Full global batches in one pass over ``split``: the same on every rank by construction."""
    n = manifest["splits"][split]["num_samples"]
    steps = n // global_batch_size
    if steps < 1:
        raise HardnegError(
            f"train.global_batch_size={global_batch_size} exceeds the {n} samples of split '{split}'"
        )
    return steps


def _rank_worker_seed(rank: int) -> int:
    info = torch.utils.data.get_worker_info()
    return rank * 1000 + (info.id if info is not None else 0)


def train_batches(
    data_path: str,
    split: str,
    two_views: Callable,
    batch_size: int,
    *,
    rank: int,
    seed: int,
    shuffle_buffer: int = 1000,
    loader_workers: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless (view1 (b,3,S,S), view2 (b,3,S,S), labels (b,)) batches for one rank, b = batch_size."""
    urls = shard_urls(data_path, read_manifest(data_path), split)
    rng = random.Random(seed * 7919 + rank)
    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, worker_seed=partial(_rank_worker_seed, rank), deterministic=True),
        _open_streams,
        tar_file_expander,
        group_by_keys,
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), rng=rng) if shuffle_buffer else (lambda s: s),
        _samples,
        wds.map(lambda pair: (*two_views(pair[0]), pair[1])),
        wds.batched(batch_size, partial=False),
        wds.map(lambda batch: (batch[0], batch[1], torch.as_tensor(batch[2]))),
    )
    if loader_workers == 0:
        yield from pipeline
        return
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=loader_workers, persistent_workers=True)
    yield from loader


def labelled_images(data_path: str, split: str) -> Iterator[tuple[Image.Image, int]]:
    """Every (image, label) of ``split`` once, in manifest order."""
    urls = shard_urls(data_path, read_manifest(data_path), split)
    stream = _open_streams({"url": u} for u in urls)
    yield from _samples(group_by_keys(tar_file_expander(stream)))


def eval_batches(
    data_path: str, split: str, transform: Callable, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images (b,3,S,S), labels (b,)) over ``split`` once, in manifest order; the last batch may be short."""
    images, labels = [], []
    for image, label in labelled_images(data_path, split):
        images.append(transform(image))
        labels.append(label)
        if len(images) == batch_size:
            yield torch.stack(images), torch.tensor(labels)
            images, labels = [], []
    if images:
        yield torch.stack(images), torch.tensor(labels)


def raw_pixels(data_path: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels (n, H*W*3) float in [0,1], labels (n,)): the raw-pixel baseline's features."""
    pixels, labels = [], []
    for image, label in labelled_images(data_path, split):
        pixels.append(np.asarray(image, dtype=np.float32).reshape(-1) / 255.0)
        labels.append(label)
    if not pixels:
        raise HardnegError(f"split '{split}' of {data_path} holds no samples")
    sizes = {p.shape for p in pixels}
    if len(sizes) > 1:
        raise HardnegError(f"raw-pixel baseline needs images of one size; split '{split}' has {len(sizes)} sizes")
    return torch.from_numpy(np.stack(pixels)), torch.tensor(labels)


def labelled_batches(
    data_path: str, split: str, transform: Callable, batch_size: int, *, seed: int, shuffle_buffer: int = 1000
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One shuffled pass over ``split``: (images (b,3,S,S), labels (b,)), the last batch may be short."""
    urls = shard_urls(data_path, read_manifest(data_path), split)
    rng = random.Random(seed)
    rng.shuffle(urls)
    stream = _samples(group_by_keys(tar_file_expander(_open_streams({"url": u} for u in urls))))
    if shuffle_buffer:
        stream = wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), rng=rng)(stream)
    images, labels = [], []
    for image, label in stream:
        images.append(transform(image))
        labels.append(label)
        if len(images) == batch_size:
            yield torch.stack(images), torch.tensor(labels)
            images, labels = [], []
    if images:
        yield torch.stack(images), torch.tensor(labels)
