"""data.order=epoch: every epoch reads each sample once, in an order that does not depend on the worker count.

The resampled stream (pipeline/data.py) makes the batch of step s a function of (seed, rank, s): exact on a
resume with the same workers, but an elastic restart on fewer workers reads other samples, and shards drawn
with replacement read some samples twice in an epoch. Here the GLOBAL batch of step s is a function of
(seed, s) alone, and each rank reads its slice of it (docs/faults.md, "Which samples an epoch reads"):
- epoch e's order: the shards in a permutation seeded by (seed, e), each shard's samples in a permutation
  seeded by (seed, e, shard); positions 0 .. N-1 of that order, N the samples of the pretraining splits;
- step s of epoch e takes positions [(s - e spe) G, (s - e spe + 1) G), G the global batch, spe = N // G;
- rank r of W reads positions [.. + r G/W, .. + (r + 1) G/W) of those.
So a run that restarts at step s on any number of workers reads exactly the positions after step s: none
lost, none twice, whatever W was before. Each rank opens only the shards its positions fall in (a shard it
needs is read whole and kept while its positions last: shards no larger than the per-worker batch keep the
reads near 1/W of the data). Augmentations are seeded per sample by (seed, step, position), so a sample's
views do not depend on W either.
"""

from __future__ import annotations

import bisect
import random
from collections import OrderedDict
from typing import Callable, Iterator, Optional, Sequence

import torch
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_prep.manifest import read_manifest
from pipeline.data import (
    SkipLedger,
    _open_streams,
    _reason,
    decode_samples,
    hash_seed,
    loader_stream,
    pretrain_shards,
    refilled,
    stacked_views,
    train_views,
)

Shard = tuple[str, int]  # (url, samples)


class EpochOrder:
    """Positions of an epoch -> (shard, sample index in the shard's tar order); a pure function of (seed, epoch)."""

    def __init__(self, shards: Sequence[Shard], seed: int):
        self.shards, self.seed = list(shards), seed
        self._epoch: Optional[int] = None

    def _layout(self, epoch: int) -> None:
        if self._epoch == epoch:
            return
        order = list(range(len(self.shards)))
        random.Random(f"{self.seed}/epoch/{epoch}").shuffle(order)
        self._order, self._starts, total = order, [], 0
        for shard in order:
            self._starts.append(total)
            total += self.shards[shard][1]
        self._perms: dict[int, list[int]] = {}
        self._epoch, self.total = epoch, total

    def _within(self, epoch: int, shard: int) -> list[int]:
        if shard not in self._perms:
            perm = list(range(self.shards[shard][1]))
            random.Random(f"{self.seed}/epoch/{epoch}/shard/{shard}").shuffle(perm)
            self._perms[shard] = perm
        return self._perms[shard]

    def locate(self, epoch: int, position: int) -> tuple[int, int]:
        """(shard index, sample index in its tar order) of ``position`` in epoch ``epoch``."""
        self._layout(epoch)
        if not 0 <= position < self.total:
            raise IndexError(f"position {position} outside the epoch's {self.total} samples")
        k = bisect.bisect_right(self._starts, position) - 1
        shard = self._order[k]
        return shard, self._within(epoch, shard)[position - self._starts[k]]


def rank_positions(step: int, spe: int, global_batch: int, rank: int, world_size: int) -> tuple[int, range]:
    """(epoch, positions) rank ``rank`` of ``world_size`` reads at ``step``: its slice of the step's global batch."""
    epoch, within = divmod(step, spe)
    share = global_batch // world_size
    start = within * global_batch + rank * share
    return epoch, range(start, start + share)


class _ShardCache:
    """The raw samples of the last few shards read (tar order), each read whole once through fsspec."""

    def __init__(self, shards: Sequence[Shard], keep: int = 2):
        self.shards, self.keep = shards, keep
        self._held: OrderedDict[int, list] = OrderedDict()

    def samples(self, shard: int, bad: list) -> list:
        if shard in self._held:
            self._held.move_to_end(shard)
            return self._held[shard]
        url = self.shards[shard][0]

        def on_error(exn: BaseException) -> bool:  # WebDataset's handler protocol: True = skip and go on
            bad.append((url, _reason(exn)))
            return True

        raw = group_by_keys(tar_file_expander(_open_streams(iter([{"url": url}])), handler=on_error), handler=on_error)
        self._held[shard] = list(raw)
        while len(self._held) > self.keep:
            self._held.popitem(last=False)
        return self._held[shard]


class EpochOrderBatches(torch.utils.data.IterableDataset):
    """One rank's batches from ``start_step`` on, in data.order=epoch (module docstring); each yields
    (*views, labels, report) with report {"read", "bad", "keys"}: the sample keys it read, for accounting."""

    def __init__(
        self,
        shards: Sequence[Shard],
        two_views: Callable,
        global_batch: int,
        *,
        rank: int,
        world_size: int,
        seed: int,
        start_step: int,
        steps_per_epoch: int,
        readers: int = 1,
        batch_views: Optional[Callable] = None,
    ):
        super().__init__()
        self.shards, self.two_views, self.batch_views = list(shards), two_views, batch_views
        self.global_batch, self.rank, self.world_size, self.seed = global_batch, rank, world_size, seed
        self.start_step, self.spe, self.readers = start_step, steps_per_epoch, readers

    def __iter__(self) -> Iterator[tuple]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        order, cache = EpochOrder(self.shards, self.seed), _ShardCache(self.shards)
        step = self.start_step + worker  # the DataLoader deals steps to its workers round-robin
        while True:
            yield self._batch(order, cache, step)
            step += self.readers

    def _batch(self, order: EpochOrder, cache: _ShardCache, step: int) -> tuple:
        epoch, positions = rank_positions(step, self.spe, self.global_batch, self.rank, self.world_size)
        bad: list = []
        window: list = []
        for position in positions:
            shard, index = order.locate(epoch, position)
            samples = cache.samples(shard, bad)
            if index < len(samples):
                window.append(samples[index])
            else:  # the shard's tar lost members (counted in bad when it was read)
                window.append(None)
                bad.append((self.shards[shard][0], f"sample {index} missing from a short shard"))
        decoded = decode_samples(window, bad)
        keys = [f"{window[i].get('__url__')}#{window[i].get('__key__')}" for i, _, _ in decoded]
        good = refilled([(positions[i], image, label) for i, image, label in decoded], len(positions))
        with torch.random.fork_rng(devices=[]):
            views = []
            for position, image, label in good:
                torch.manual_seed(hash_seed(self.seed, step, position))  # per sample: the same views at any W
                views.append((*self.two_views(image), label))
            torch.manual_seed(hash_seed(self.seed, step, positions.start))  # the per-batch step's draws, if any
            batch = stacked_views(views, self.batch_views)
        return (*batch, {"read": len(positions), "bad": bad, "keys": keys})


def epoch_order_batches(
    shards: Sequence[Shard],
    two_views: Callable,
    global_batch: int,
    *,
    rank: int,
    world_size: int,
    seed: int,
    start_step: int,
    steps_per_epoch: int,
    loader_workers: int = 0,
    ledger: Optional[SkipLedger] = None,
    batch_views: Optional[Callable] = None,
    on_keys: Optional[Callable[[int, list], None]] = None,
) -> Iterator[tuple]:
    """Endless batches of one rank in data.order=epoch: (view1, view2, labels), or (images, labels) for a
    1-tuple ``two_views``. ``on_keys(step, keys)`` receives the sample keys of each step (tests, audits)."""
    dataset = EpochOrderBatches(
        shards,
        two_views,
        global_batch,
        rank=rank,
        world_size=world_size,
        seed=seed,
        start_step=start_step,
        steps_per_epoch=steps_per_epoch,
        readers=max(1, loader_workers),
        batch_views=batch_views,
    )
    ledger = ledger if ledger is not None else SkipLedger()
    step = start_step
    for *batch, report in loader_stream(dataset, loader_workers):
        ledger.add(report)
        if on_keys is not None:
            on_keys(step, report["keys"])
        step += 1
        yield tuple(batch)


def train_loader(cfg, rank: int, world_size: int, device: torch.device, start_step: int, spe: int, ledger: SkipLedger):
    """data.train_loader's (batches, on-device view maker or None) for data.order=epoch."""
    two_views, batch_views, device_views = train_views(cfg, device)
    shards = pretrain_shards(cfg.data.path, read_manifest(cfg.data.path), cfg.data.pretrain)
    batches = epoch_order_batches(
        shards,
        two_views,
        cfg.train.global_batch_size,
        rank=rank,
        world_size=world_size,
        seed=cfg.train.seed,
        start_step=start_step,
        steps_per_epoch=spe,
        loader_workers=cfg.data.loader_workers,
        ledger=ledger,
        batch_views=batch_views,
    )
    return batches, device_views
