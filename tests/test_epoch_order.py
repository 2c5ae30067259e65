"""data.order=epoch: each sample once per epoch, the global batch of a step independent of the worker count,
so a run resized mid-epoch reads exactly the samples not yet read (real digits shards on disk)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from data_prep.manifest import read_manifest
from pipeline import augment, config, data
from pipeline.epoch_order import EpochOrder, epoch_order_batches, rank_positions
from pipeline.errors import HardnegError

G = 128


@pytest.fixture(scope="module")
def shards(digits_shards):
    return data.pretrain_shards(digits_shards, read_manifest(digits_shards), "train")


def _views() -> augment.TwoViews:
    cfg = config.load(None, ["augment.image_size=8"]).augment
    return augment.TwoViews(augment.view_transform(cfg))


def _decoded_only(image) -> tuple[torch.Tensor]:
    """A view maker that makes no views: the accounting tests count samples, not pixels."""
    return (torch.zeros(()),)


def _read(shards, steps: range, world: int, spe: int) -> dict[int, list[list[str]]]:
    """{step: [keys of rank 0, keys of rank 1, ...]} for ``steps`` read by ``world`` ranks from steps.start."""
    seen: dict[int, list[list[str]]] = {s: [] for s in steps}
    for rank in range(world):
        batches = epoch_order_batches(
            shards,
            _decoded_only,
            G,
            rank=rank,
            world_size=world,
            seed=3,
            start_step=steps.start,
            steps_per_epoch=spe,
            on_keys=lambda step, keys: seen[step].append(keys),
        )
        for _ in steps:
            next(batches)
    return seen


def test_an_epoch_is_a_permutation_of_the_samples(shards):
    order = EpochOrder(shards, seed=1)
    total = sum(n for _, n in shards)
    for epoch in (0, 1):
        picked = [order.locate(epoch, p) for p in range(total)]
        assert len(set(picked)) == total  # every (shard, sample) exactly once
        assert Counter(s for s, _ in picked) == Counter({i: n for i, (_, n) in enumerate(shards)})
    assert [order.locate(0, p) for p in range(50)] != [order.locate(1, p) for p in range(50)]  # reshuffled
    assert rank_positions(7, 5, 128, 1, 2) == (1, range(2 * 128 + 64, 3 * 128))


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_a_resize_mid_epoch_reads_exactly_the_samples_not_yet_read(shards, before, after):
    total = sum(n for _, n in shards)
    spe = total // G
    cut = spe // 2
    first = _read(shards, range(0, cut), before, spe)
    rest = _read(shards, range(cut, spe), after, spe)
    keys = Counter(k for part in (first, rest) for ranks in part.values() for rank in ranks for k in rank)
    print(
        f"\n[epoch] {total} samples, {spe} steps of {G}: {cut} steps on {before} worker(s), then {spe - cut} on {after}"
    )
    assert max(keys.values()) == 1  # none read twice
    assert len(keys) == spe * G  # none lost: every position of the epoch's full batches
    uninterrupted = _read(shards, range(0, spe), 1, spe)
    assert set(keys) == {k for ranks in uninterrupted.values() for k in ranks[0]}  # the same samples, any W
    for step, ranks in (first | rest).items():  # the same global batch, in rank order, at every step
        assert [k for rank in ranks for k in rank] == uninterrupted[step][0]


def test_the_global_batch_and_its_views_do_not_depend_on_the_worker_count(shards):
    spe = sum(n for _, n in shards) // G
    one = epoch_order_batches(shards, _views(), G, rank=0, world_size=1, seed=5, start_step=2, steps_per_epoch=spe)
    halves = [
        epoch_order_batches(shards, _views(), G, rank=r, world_size=2, seed=5, start_step=2, steps_per_epoch=spe)
        for r in range(2)
    ]
    whole = next(one)
    parts = [next(h) for h in halves]
    for column, tensor in enumerate(whole):
        assert torch.equal(tensor, torch.cat([p[column] for p in parts]))


def test_a_corrupt_sample_is_skipped_counted_and_refilled(tmp_path, shards):
    import io
    import tarfile

    url, count = shards[0]
    broken = tmp_path / "broken.tar"
    with tarfile.open(url) as src, tarfile.open(broken, "w") as dst:
        spoiled = False
        for member in src.getmembers():
            payload = src.extractfile(member).read()
            if not spoiled and member.name.endswith((".png", ".jpg", ".jpeg", ".webp")):
                payload, spoiled = b"not an image", True
            member.size = len(payload)
            dst.addfile(member, io.BytesIO(payload))
    ledger = data.SkipLedger(announce=False)
    batches = epoch_order_batches(
        [(str(broken), count)], _views(), count, rank=0, world_size=1, seed=0, start_step=0, steps_per_epoch=1,
        ledger=ledger,
    )  # fmt: skip
    x1, _, labels = next(batches)
    assert x1.shape[0] == count and labels.shape == (count,)  # full batch: the bad slot refilled
    assert ledger.read == count and ledger.skipped == 1


def test_epoch_order_refuses_ffcv():
    with pytest.raises(HardnegError, match="data.order=epoch reads WebDataset shards"):
        config.load(None, ["data.order=epoch", "data.format=ffcv"])
