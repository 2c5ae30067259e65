"""A validation split held out of train (`hardneg prep --val-fraction`): stratified, fixed seed, no test-set selection.

``HoldoutSource`` wraps any Source: its ``train`` split is divided, per class, into ``train`` and
``holdout`` (the kNN monitor and checkpoints/best read the latter; the test split stays for the final
evaluation only). The division is a pure function of the labels, the fraction and ``HOLDOUT_SEED``.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Optional

import numpy as np

from data_prep.errors import HardnegError
from data_prep.sources import Record, Source

HOLDOUT_SPLIT = "holdout"
HOLDOUT_SEED = 0  # fixed: the same images are held out whatever --seed shuffles the shards with
TEST_SPLIT = "test"  # `hardneg prep --test-fraction`: a test split for a source that has none (an imagefolder)
TEST_SEED = 1
# sources that hold one out by default (a recipe on them selects on it); others: --val-fraction to opt in
DEFAULT_VAL_FRACTION = {"builtin:digits": 0.1}


def default_val_fraction(spec: str) -> float:
    """The fraction ``hardneg prep`` holds out of ``spec``'s train split when --val-fraction is not given."""
    return DEFAULT_VAL_FRACTION.get(spec, 0.0)


def stratified_holdout(labels, fraction: float, seed: int = HOLDOUT_SEED) -> list[int]:
    """Sorted positions to hold out: round(fraction * n_c) of each class c (at least 1 when fraction > 0 and n_c > 1).

    Each class is permuted by a generator seeded with (seed, class), so adding a class changes no other.
    Labels < 0 (unreadable records) are never held out.
    """
    return held_out(labels, fraction, seed).tolist()


def held_out(labels, fraction: float, seed: int = HOLDOUT_SEED) -> np.ndarray:
    """stratified_holdout as a sorted int64 array (``labels``: a sequence or an int array); no per-record objects."""
    if not 0.0 <= fraction < 1.0:
        raise HardnegError(f"val_fraction={fraction!r}; expected a number in [0, 1)")
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if not len(labels):
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(labels, kind="stable")  # by class, positions ascending within; unreadable (< 0) first
    ordered = labels[order]
    starts = np.concatenate([[0], np.flatnonzero(ordered[1:] != ordered[:-1]) + 1])  # each label's first
    ends = np.append(starts[1:], len(ordered))
    held: list[np.ndarray] = []
    for label, start, end in zip(ordered[starts].tolist(), starts.tolist(), ends.tolist(), strict=True):
        if label < 0:
            continue
        positions, n = order[start:end], end - start
        n_out = min(n - 1, max(1 if fraction > 0 else 0, int(math.floor(fraction * n + 0.5))))
        rng = np.random.default_rng([int(seed), zlib.crc32(str(label).encode())])
        held.append(positions[rng.permutation(n)[: max(n_out, 0)]])
    return np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)


def _labels(source: Source, split: str) -> np.ndarray:
    """Every label of ``split`` (-1 where the record cannot be read): the source's own list when it has one."""
    own = getattr(source, "labels", None)
    if callable(own):
        return np.asarray(own(split), dtype=np.int64)
    n = source.sizes[split]
    items = source.load(split, range(n))
    return np.fromiter((-1 if isinstance(item, dict) else int(item.label) for item in items), np.int64, count=n)


class HoldoutSource(Source):
    """``source`` with ``fraction`` of its train split (per class) moved to a ``holdout`` split (or, with
    ``split="test"``, to a test split for a source that has none)."""

    def __init__(self, source: Source, fraction: float, seed: int = HOLDOUT_SEED, split: str = HOLDOUT_SPLIT):
        flag = "--val-fraction" if split == HOLDOUT_SPLIT else f"--{split}-fraction"
        if "train" not in source.sizes:
            raise HardnegError(f"{flag} needs a 'train' split; {source.spec} has {', '.join(source.sizes)}")
        if split in source.sizes:
            raise HardnegError(f"{source.spec} already has a '{split}' split; use {flag} 0")
        self.inner, self.fraction, self.seed, self.split = source, float(fraction), int(seed), split
        self.key = "val" if split == HOLDOUT_SPLIT else split  # the manifest's prep.<key>_fraction
        self.spec, self.classes, self.decodes_files = source.spec, source.classes, source.decodes_files
        self.info, self.skipped = dict(source.info), list(source.skipped)
        held = held_out(_labels(source, "train"), self.fraction, self.seed)
        # inner train positions of each outer split, ascending (arrays: no Python int per record)
        kept = np.ones(source.sizes["train"], dtype=bool)
        kept[held] = False
        self.positions = {"train": np.flatnonzero(kept), split: held}
        self.sizes = {
            **{k: v for k, v in source.sizes.items()},
            "train": len(self.positions["train"]),
            split: len(held),
        }

    def settings(self) -> dict:
        """What the manifest's prep section records of this division (and of the ones inside it)."""
        inner = self.inner.settings() if isinstance(self.inner, HoldoutSource) else {}
        return inner | {
            f"{self.key}_fraction": self.fraction,
            f"{self.key}_seed": self.seed,
            f"{self.key}_split": self.split,
        }

    def labels(self, split: str) -> np.ndarray:
        """Every label of ``split`` (-1: unreadable), from the inner source's labels: nothing is decoded twice."""
        inner = _labels(self.inner, "train" if split in self.positions else split)
        return inner[self.positions[split]] if split in self.positions else inner

    def signature(self) -> dict:
        return {**self.inner.signature(), f"{self.key}_fraction": self.fraction, f"{self.key}_seed": self.seed}

    def _where(self, split: str, index: int) -> tuple[str, int]:
        if split in self.positions:
            return "train", int(self.positions[split][index])
        return split, index

    def record(self, split: str, index: int) -> Record:
        inner_split, inner_index = self._where(split, index)
        rec = self.inner.record(inner_split, inner_index)
        return rec if split == inner_split else dataclasses.replace(rec, split=split)

    def load(self, split: str, positions):
        """Records (or skip entries) of ``positions`` of ``split``, through the inner source's own loader."""
        positions = [int(i) for i in positions]
        inner_split = "train" if split in self.positions else split
        mapped = [self._where(split, i)[1] for i in positions] if split in self.positions else list(positions)
        for pos, item in zip(positions, self.inner.load(inner_split, mapped), strict=True):
            if isinstance(item, dict):
                yield dict(item, split=split, index=int(pos))
            else:
                yield item if split == inner_split else dataclasses.replace(item, split=split)


def with_test(source: Source, fraction: Optional[float]) -> Source:
    """``source`` itself when ``fraction`` is None or 0, else a HoldoutSource whose ``test`` split is that share
    of train, per class (`hardneg prep --test-fraction`)."""
    if fraction is None or fraction == 0:
        return source
    if not 0.0 < fraction < 1.0:
        raise HardnegError(f"--test-fraction={fraction!r}; expected a number in [0, 1)")
    return HoldoutSource(source, fraction, TEST_SEED, TEST_SPLIT)


def with_holdout(source: Source, fraction: Optional[float]) -> Source:
    """``source`` itself when the fraction (None: the source's default) is 0, else a HoldoutSource."""
    fraction = default_val_fraction(source.spec) if fraction is None else fraction
    if not 0.0 <= fraction < 1.0:
        raise HardnegError(f"--val-fraction={fraction!r}; expected a number in [0, 1)")
    return HoldoutSource(source, fraction) if fraction > 0 else source
