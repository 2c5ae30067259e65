"""Pieces the queue/bank methods (PSM, MoCHi) share: a FIFO bank of keys held as buffers, the no-grad
gather, labels of unknown class, and the histogram groups of a bank method."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.losses.psm import fifo_enqueue


def no_grad_gather(gather: Optional[Callable]) -> Callable:
    """The injected gather applied to detached tensors (rank order, no graph); identity without one."""
    if gather is None:
        return lambda x: x.detach()
    return lambda x: gather(x.detach())


def random_bank(size: int, dim: int) -> torch.Tensor:
    """(size, dim) random unit rows, the MoCo / lightly initial queue (global RNG: equal on every rank)."""
    return F.normalize(torch.randn(size, dim), dim=1)


def register_key_bank(module: nn.Module, name: str, size: int, dim: int) -> None:
    """Buffers of a FIFO bank of keys: ``name`` (size, dim) random unit keys, ``name_ptr``, ``name_labels`` (-1)."""
    module.register_buffer(name, random_bank(size, dim))
    module.register_buffer(f"{name}_ptr", torch.zeros((), dtype=torch.long))
    module.register_buffer(f"{name}_labels", torch.full((size,), -1, dtype=torch.long))


@torch.no_grad()
def push_keys_(module: nn.Module, name: str, keys: torch.Tensor, labels: torch.Tensor) -> None:
    """Enqueue keys (n, d) and their labels (n,) into the bank ``name`` in place (a ring: see fifo_enqueue)."""
    bank, bank_labels, bank_ptr = (
        getattr(module, name),
        getattr(module, f"{name}_labels"),
        getattr(module, f"{name}_ptr"),
    )
    ptr = int(bank_ptr)
    new_bank, new_ptr = fifo_enqueue(bank, ptr, keys)
    new_labels, _ = fifo_enqueue(bank_labels[:, None], ptr, labels[:, None])
    bank.copy_(new_bank)
    bank_labels.copy_(new_labels[:, 0])
    bank_ptr.fill_(new_ptr)


def labels_or_unknown(labels: Optional[torch.Tensor], n: int, device) -> torch.Tensor:
    """Labels as (n,) long, or (n,) of -1 (unknown) when the batch carries none."""
    return labels.reshape(-1).long() if labels is not None else torch.full((n,), -1, dtype=torch.long, device=device)


@torch.no_grad()
def bank_samples(
    q: torch.Tensor,
    k: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    labels: Optional[torch.Tensor],
    n_hard: int,
) -> dict[str, torch.Tensor]:
    """Histogram groups of a queue/bank method: q.k positives, bank negatives by class, the n_hard hardest.

    q, k: (n, d) queries and their momentum keys; bank: (M, d) unit keys with labels (M,) (-1: unknown).
    """
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    sims = q @ bank.float().T  # (n, M)
    samples = {"positive": (q * k).sum(dim=1)}
    if labels is not None:
        own = labels.to(q.device)[:, None]  # (n, 1)
        known = (bank_labels >= 0)[None, :].expand_as(sims)  # (n, M)
        same = (bank_labels[None, :] == own) & known
        samples["same-class negative"] = sims[same]
        samples["other-class negative"] = sims[known & ~same]
        samples["negative of unknown class (bank warm-up)"] = sims[~known]
    else:
        samples["negative"] = sims.ravel()
    hard = min(n_hard, sims.shape[1])
    samples[f"{hard} hardest negatives per anchor"] = sims.topk(hard, dim=1).values.ravel()
    return samples
