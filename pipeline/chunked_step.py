"""The chunked step: one optimizer step's gradients with the activations of one chunk alive at a time.

Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup"; docs/methods.md, "The chunked step"): the per-worker batch is cut into chunks of
``train.chunk_size`` samples.
1. Each chunk goes through the objective's trained side (``embed``) without a graph, and through its
   key side (``keys``, no graph in any case); only the embeddings are kept.
2. The method's loss (``loss_from``) runs once on the concatenated embeddings exactly as in the plain
   step (local rows against gathered global columns, row-tiled under ``train.loss_tile``); its gradient
   is taken w.r.t. the embeddings only.
3. Each chunk goes through ``embed`` again with a graph and backpropagates its slice of that gradient,
   so the parameter gradients are those of one pass over all chunks with a graph.
Exactness: each chunk is one BatchNorm group in both passes; the second pass normalises with the same
batch statistics but leaves the running statistics alone (they advance once per chunk, in pass 1);
the global RNG is put back to its state before each chunk's first pass, so dropout and any other
draw repeats. The objective's contract: ``forward(x1, x2, labels, with_stats)`` equals
``loss_from(embed(x1, x2), keys(x1, x2), labels, with_stats)``, and embeddings concatenate along dim 0.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

CHUNKED_PARTS = ("embed", "keys", "loss_from")  # what an objective needs for train.chunk_size


def supports_chunks(objective: nn.Module) -> bool:
    """True when the objective splits into embed / keys / loss_from (every built-in method does)."""
    return all(callable(getattr(objective, part, None)) for part in CHUNKED_PARTS)


def chunk_bounds(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """[(start, stop)] of consecutive chunks of ``chunk_size`` rows covering n rows (the last may be short)."""
    return [(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]


@contextmanager
def running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers in training mode normalise with batch statistics but do not update running ones."""
    layers = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for layer in layers:
        layer.track_running_stats = False  # train mode: batch statistics, running buffers untouched
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


def _rng_state(device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, Optional[torch.Tensor]], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def chunked_step(
    objective: Any,  # an nn.Module with embed / keys / loss_from (supports_chunks)
    x1: torch.Tensor,
    x2: torch.Tensor,
    labels: Optional[torch.Tensor],
    *,
    chunk_size: int,
    with_stats: bool = False,
) -> tuple[torch.Tensor, dict]:
    """Accumulate into .grad the gradient of the objective's loss on views x1, x2 (n, ...) in chunks; (loss, stats).

    The caller zeroes the gradients before and averages them over ranks after (one collective per step).
    """
    device = x1.device
    bounds = chunk_bounds(x1.shape[0], chunk_size)
    states, embedded, keyed = [], [], []
    with torch.no_grad():
        for start, stop in bounds:
            states.append(_rng_state(device))
            embedded.append(objective.embed(x1[start:stop], x2[start:stop]))
            keyed.append(objective.keys(x1[start:stop], x2[start:stop]))
    emb = torch.cat(embedded).requires_grad_()  # a leaf: the loss's backward stops here
    keys = None if keyed[0] is None else torch.cat(keyed)
    del embedded, keyed
    loss, stats = objective.loss_from(emb, keys, labels, with_stats)
    loss.backward()  # d loss / d emb; a gathered column's gradient is summed over ranks by the gather's backward
    grad = emb.grad
    assert grad is not None, "chunked_step: the loss does not depend on the embeddings"
    after = _rng_state(device)
    with running_stats_frozen(objective):
        for (start, stop), state in zip(bounds, states, strict=True):
            _set_rng_state(state, device)
            objective.embed(x1[start:stop], x2[start:stop]).backward(grad[start:stop])
    _set_rng_state(after, device)
    return loss.detach(), stats
