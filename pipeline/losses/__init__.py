"""Contrastive losses: pure functions, the functional core the methods (pipeline/methods/) bind.

LOSSES lists the in-batch loss functions (NT-Xent, DCL, HCL, SSCL) by function name for tests and
benchmarks; it is not the method table (pipeline/methods/__init__.py is). The queue/bank methods
(PSM, MoCHi) export their functional pieces; their objectives live in pipeline/methods/."""

from __future__ import annotations

from typing import Callable

from .functional import dcl, hcl, nt_xent, sscl
from .mochi import draw_mixes, mochi_logits, mochi_loss, mochi_synthesize
from .psm import acceptance_probability, fifo_enqueue, nearest_neighbors, psm_hard_loss, psm_soft_loss, psm_soft_parts

LOSSES: dict[str, Callable[..., object]] = {
    "nt_xent": nt_xent,
    "dcl": dcl,
    "hcl": hcl,
    "sscl": sscl,
}

__all__ = [
    "LOSSES",
    "acceptance_probability",
    "dcl",
    "draw_mixes",
    "fifo_enqueue",
    "hcl",
    "mochi_logits",
    "mochi_loss",
    "mochi_synthesize",
    "nearest_neighbors",
    "nt_xent",
    "psm_hard_loss",
    "psm_soft_loss",
    "psm_soft_parts",
    "sscl",
]
