"""The validation split held out of train (hardneg prep --val-fraction): stratified, fixed seed, in the manifest."""

from __future__ import annotations

import math
import zlib
from collections import Counter

import numpy as np
import pytest

from data_prep.holdout import HoldoutSource, default_val_fraction, held_out, stratified_holdout
from data_prep.manifest import read_manifest
from data_prep.sources import open_source
from pipeline.errors import HardnegError


def test_stratified_holdout_is_per_class_fixed_and_seeded():
    labels = [i % 3 for i in range(30)] + [5, 5]  # 10 of each of 0, 1, 2; 2 of class 5
    held = stratified_holdout(labels, 0.2)
    assert held == stratified_holdout(labels, 0.2) and held == sorted(set(held))
    assert Counter(labels[i] for i in held) == {0: 2, 1: 2, 2: 2, 5: 1}  # every class keeps one in train
    assert stratified_holdout(labels, 0.2, seed=1) != held
    assert stratified_holdout(labels, 0.0) == [] and stratified_holdout([-1, -1, 0, 0], 0.5) in ([2], [3])
    with pytest.raises(HardnegError, match="val_fraction"):
        stratified_holdout(labels, 1.0)


def test_digits_source_holds_out_of_train_only():
    inner = open_source("builtin:digits")
    src = HoldoutSource(inner, 0.1)
    assert src.sizes == {"train": 1347, "test": 300, "holdout": 150} and default_val_fraction("builtin:digits") == 0.1
    train_ids = {src.record("train", i).source_index for i in range(src.sizes["train"])}
    held = [src.record("holdout", i) for i in range(150)]
    assert not train_ids & {r.source_index for r in held} and all(r.split == "holdout" for r in held)
    assert train_ids | {r.source_index for r in held} == {inner.record("train", i).source_index for i in range(1497)}
    assert Counter(r.label for r in held) == {c: 15 for c in range(10)}
    assert [r.source_index for r in src.load("holdout", [3, 0])] == [held[3].source_index, held[0].source_index]
    with pytest.raises(HardnegError, match="already has a 'holdout' split"):
        HoldoutSource(src, 0.1)


def test_prep_records_the_holdout_in_the_manifest(digits_shards, tmp_path):
    manifest = read_manifest(digits_shards)
    assert manifest["prep"]["val_fraction"] == 0.1 and manifest["prep"]["val_split"] == "holdout"
    assert manifest["splits"]["holdout"]["num_samples"] == 150
    from data_prep.prep import prepare

    plain = prepare("builtin:digits", str(tmp_path / "plain"), val_fraction=0.0)
    assert "holdout" not in plain["splits"] and "val_fraction" not in plain["prep"]
    assert plain["splits"]["train"]["num_samples"] == 1497


def _old_stratified_holdout(labels: list, fraction: float, seed: int = 0) -> list:
    """stratified_holdout as it was, with a Python list per class."""
    by_class: dict = {}
    for pos, label in enumerate(labels):
        if label >= 0:
            by_class.setdefault(int(label), []).append(pos)
    held: list = []
    for label, positions in sorted(by_class.items()):
        n_out = min(len(positions) - 1, max(1 if fraction > 0 else 0, int(math.floor(fraction * len(positions) + 0.5))))
        rng = np.random.default_rng([int(seed), zlib.crc32(str(label).encode())])
        held += [positions[i] for i in rng.permutation(len(positions))[: max(n_out, 0)]]
    return sorted(held)


@pytest.mark.parametrize("seed", [0, 5])
def test_array_holdout_holds_out_what_the_list_version_did(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(-1, 13, 5000).tolist() + [20] + [10**12] * 3  # unreadable, a class of one, a huge id
    for fraction in (0.0, 0.01, 0.1, 0.37):
        new = stratified_holdout(labels, fraction, seed)
        assert new == _old_stratified_holdout(labels, fraction, seed)
        assert all(type(i) is int for i in new)
        assert np.array_equal(held_out(np.asarray(labels), fraction, seed), new)
    assert stratified_holdout([], 0.1) == [] and stratified_holdout([-1, -1], 0.1) == []
