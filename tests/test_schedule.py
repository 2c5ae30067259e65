"""The loop's decisions as pure functions of the step: length, epochs, when to log and checkpoint."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from pipeline import dist, schedule


def test_planned_steps_and_epochs():
    assert schedule.planned_steps(epochs=3, steps_per_epoch=10, max_steps=None) == 30
    assert schedule.planned_steps(epochs=3, steps_per_epoch=10, max_steps=25) == 25
    assert schedule.planned_steps(epochs=3, steps_per_epoch=10, max_steps=99) == 30
    assert [schedule.epoch_of(d, 10) for d in (1, 10, 11, 20, 25)] == [1, 1, 2, 2, 3]  # a partial last epoch counts


def test_plan_logs_every_n_steps_and_at_every_epoch_end():
    plans = [
        schedule.plan_step(s, steps_per_epoch=5, total_steps=12, log_every=4, checkpoint_every=0) for s in range(12)
    ]
    assert [p.done for p in plans if p.log_now] == [4, 5, 8, 10, 12]
    assert [p.done for p in plans if p.epoch_end] == [5, 10, 12]  # 12: train.max_steps ends the run mid-epoch
    assert [p.done for p in plans if p.last] == [12]
    assert not any(p.step_due or p.step_save for p in plans)  # checkpoint_every=0: none by steps


def test_a_step_checkpoint_on_an_epoch_end_is_served_by_the_epoch():
    plans = [
        schedule.plan_step(s, steps_per_epoch=6, total_steps=12, log_every=100, checkpoint_every=3) for s in range(12)
    ]
    assert [p.done for p in plans if p.step_due] == [3, 6, 9, 12]
    assert [p.done for p in plans if p.step_save] == [3, 9]  # 6 and 12 are epoch ends
    assert all(p.log_now for p in plans if p.step_save)  # a step checkpoint is a log step (one collective)


def test_time_checkpoint_due():
    assert schedule.time_checkpoint_due(now=100.0, saved_at=40.0, every_s=60.0)
    assert not schedule.time_checkpoint_due(now=99.0, saved_at=40.0, every_s=60.0)
    assert not schedule.time_checkpoint_due(now=1e9, saved_at=0.0, every_s=0.0)  # 0: off


def test_lr_schedule_warmup_then_cosine():
    lrs = [schedule.lr_at(s, 1.0, warmup_steps=4, total_steps=20, min_ratio=0.1) for s in range(20)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[-1] > 0.1 and all(a >= b for a, b in pairwise(lrs[4:]))


def test_metrics_are_reduced_by_name_in_one_dict():
    """One process: the mean is the value itself, keyed as given, in float64 whatever the input dtype."""
    out = dist.all_reduce_mean_named(
        {
            "loss": torch.tensor(2.5),
            "b": torch.tensor(1, dtype=torch.int64),
            "a": torch.tensor(0.1, dtype=torch.float64),
        },
        torch.device("cpu"),
    )
    assert out == {"a": 0.1, "b": 1.0, "loss": 2.5} and list(out) == ["a", "b", "loss"]
