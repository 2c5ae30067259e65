"""Losses compute in float32 or wider: a decorator that switches autocast off around a loss function."""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor


def full_precision(fn: Callable) -> Callable:
    """Run ``fn(x, ...)`` with autocast off on x's device (under bf16 autocast its matmuls would run in bf16).

    The inputs keep their dtype; the functions promote them to float32 or wider themselves.
    """

    @functools.wraps(fn)
    def wrapper(x: Tensor, *args, **kwargs):
        with torch.autocast(x.device.type, enabled=False):
            return fn(x, *args, **kwargs)

    return wrapper
