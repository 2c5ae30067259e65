"""Pure: records per split -> shard specs (a seeded shuffle, then chunks of ``shard_size``).

A split's plan is one numpy permutation (8 bytes per record, the one per-record cost of prep's main
process); each spec holds a slice of it, not a tuple of Python ints.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from data_prep.errors import HardnegError


@dataclass(frozen=True, eq=False)
class ShardSpec:
    """Shard ``index`` of ``split`` holds the split's records at positions ``records`` (int64 array), in that order."""

    split: str
    index: int
    records: np.ndarray

    def __eq__(self, other) -> bool:
        if not isinstance(other, ShardSpec):
            return NotImplemented
        return (self.split, self.index) == (other.split, other.index) and np.array_equal(self.records, other.records)

    def __hash__(self) -> int:
        return hash((self.split, self.index, self.records.tobytes()))


def _check_int(name: str, value, minimum: int) -> None:
    """Raise HardnegError unless ``value`` is an int >= ``minimum``."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise HardnegError(f"{name}={value!r}; expected an integer >= {minimum}")


def split_order(n: int, seed: int, split: str) -> np.ndarray:
    """The shuffled positions 0..n-1 of ``split`` (int64), seeded by (seed, split name) only."""
    # Seeded by (seed, split name) so adding or removing a split never changes another's plan.
    rng = np.random.default_rng([int(seed), zlib.crc32(split.encode("utf-8"))])
    order = rng.permutation(int(n))
    order.flags.writeable = False  # specs share it
    return order


def plan_shards(sizes: Mapping[str, int], shard_size: int, seed: int) -> list[ShardSpec]:
    """Shuffle each split once with ``seed`` (independently of the other splits) and cut it into shards."""
    _check_int("shard_size", shard_size, 1)
    _check_int("seed", seed, 0)
    specs = []
    for split, n in sizes.items():
        _check_int(f"size of split '{split}'", n, 0)
        order = split_order(n, seed, split)
        for index, start in enumerate(range(0, n, shard_size)):
            specs.append(ShardSpec(split, index, order[start : start + shard_size]))
    return specs
