"""Row tiles for the losses: the (rows x columns) logits built a tile of anchors at a time (Inf-CL's idea).

A contrastive loss over a global batch is a mean over anchor rows of a function of that row against every
column. With ``train.loss_tile`` set, each loss computes its per-row terms on tiles of at most that many
whole rows (every negative of each anchor stays in its row, so HCL's weights, SSCL's top-k and MoCHi's
selections are those of the untiled loss), each tile under activation checkpointing: its forward keeps
nothing of the (tile x columns) intermediates, and backward rebuilds one tile at a time. The loss's memory
is then O(tile x columns) instead of O(rows x columns). The tile size is an execution setting, like
autocast, so it is set around the loss call (``loss_tile``) rather than bound into every loss's arguments.
Random draws a loss makes are drawn once, for all rows, before the tiles (the draw protocols of synth.py
and mochi.py are per global row already), so a tiled loss draws exactly what the untiled one does.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

_TILE: ContextVar[Optional[int]] = ContextVar("loss_tile", default=None)


@contextmanager
def loss_tile(rows: Optional[int]) -> Iterator[None]:
    """Within the block, losses build their logits ``rows`` anchors at a time (None: all rows at once)."""
    if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or rows < 1):
        raise ValueError(f"loss_tile={rows!r}; expected an integer >= 1 or None")
    token = _TILE.set(rows)
    try:
        yield
    finally:
        _TILE.reset(token)


def tiled(n_rows: int) -> Optional[int]:
    """The tile size to use for ``n_rows`` rows: None when untiled or when one tile would hold every row."""
    tile = _TILE.get()
    return None if tile is None or tile >= n_rows else tile


def tiled_row_sum(per_rows: Callable[[int, int], Tensor], n_rows: int, tile: int) -> Tensor:
    """sum over tiles [a, b) of per_rows(a, b).sum(): per_rows gives the (b - a,) terms of rows a..b-1.

    Each tile runs under non-reentrant checkpointing, so only its scalar and the tensors the closure
    already holds stay alive; backward recomputes the tile (the closure must be deterministic: draws are
    made before, outside it).
    """
    total: Optional[Tensor] = None
    for start in range(0, n_rows, tile):
        stop = min(start + tile, n_rows)
        part = checkpoint(_summed, per_rows, start, stop, use_reentrant=False, preserve_rng_state=False)
        total = part if total is None else total + part
    assert total is not None, "tiled_row_sum: no rows"
    return total


def tiled_rows(per_rows: Callable[[int, int], Tensor], n_rows: int, tile: int) -> Tensor:
    """torch.cat over tiles [a, b) of per_rows(a, b) (rows along dim 0), each tile checkpointed: per-row
    values (with their graph) that a loss reduces across ranks or rows before its mean."""
    parts = [
        checkpoint(per_rows, start, min(start + tile, n_rows), use_reentrant=False, preserve_rng_state=False)
        for start in range(0, n_rows, tile)
    ]
    return torch.cat(parts)


def _summed(per_rows: Callable[[int, int], Tensor], start: int, stop: int) -> Tensor:
    return per_rows(start, stop).sum()


def row_mean(per_rows: Callable[[int, int], Tensor], n_rows: int) -> Tensor:
    """mean over rows of per_rows(0, n_rows): in one piece when untiled, else tile by tile (``tiled_row_sum``)."""
    tile = tiled(n_rows)
    if tile is None:
        return per_rows(0, n_rows).mean()
    return tiled_row_sum(per_rows, n_rows, tile) / n_rows


def no_grad_rows(fn: Callable[[int, int], Tensor], n_rows: int) -> Tensor:
    """torch.cat of fn(a, b) over tiles (no graph): a per-row selection (top-k, argmax) made tile by tile."""
    tile = tiled(n_rows)
    with torch.no_grad():
        if tile is None:
            return fn(0, n_rows)
        return torch.cat([fn(a, min(a + tile, n_rows)) for a in range(0, n_rows, tile)])
