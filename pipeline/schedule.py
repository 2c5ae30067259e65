"""What a step does besides training, as pure functions of the step and the config (DINO's schedules,
nanoGPT's get_lr): the learning rate, the run's length, and whether to log, checkpoint or end an epoch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up then cosine decay to base_lr*min_ratio: a pure function of the step."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def planned_steps(epochs: int, steps_per_epoch: int, max_steps: Optional[int]) -> int:
    """The run's length in steps: ``epochs`` of ``steps_per_epoch``, cut to ``max_steps`` when that is shorter
    (the learning-rate schedule follows the shorter run)."""
    total = steps_per_epoch * epochs
    return min(total, max_steps) if max_steps is not None else total


def epoch_of(done: int, steps_per_epoch: int) -> int:
    """The epoch that ``done`` steps complete; a last, partial epoch (train.max_steps) counts as one."""
    return -(-done // steps_per_epoch)


@dataclass(frozen=True)
class StepPlan:
    """What happens after step ``done - 1``: everything but the time-based checkpoint and stop requests."""

    done: int  # steps completed after this one
    epoch_end: bool  # the epoch's end (or the run's, when train.max_steps ends it mid-epoch)
    last: bool  # the run's last step
    step_due: bool  # train.checkpoint_every_steps falls here
    step_save: bool  # ... and no epoch end serves it
    log_now: bool  # the step's metrics are reduced and logged


def plan_step(step: int, steps_per_epoch: int, total_steps: int, log_every: int, checkpoint_every: int) -> StepPlan:
    """The decisions of ``step`` (0-based) as a pure function of the step and the run's shape."""
    done = step + 1
    epoch_end = done % steps_per_epoch == 0 or done == total_steps
    step_due = bool(checkpoint_every) and done % checkpoint_every == 0
    step_save = step_due and not epoch_end  # on an epoch end, the epoch's checkpoint serves
    return StepPlan(
        done=done,
        epoch_end=epoch_end,
        last=done == total_steps,
        step_due=step_due,
        step_save=step_save,
        log_now=done % log_every == 0 or epoch_end or step_save,
    )


def time_checkpoint_due(now: float, saved_at: float, every_s: float) -> bool:
    """train.checkpoint_every_minutes: has ``every_s`` passed since the last checkpoint (0: never)."""
    return every_s > 0 and now - saved_at >= every_s
