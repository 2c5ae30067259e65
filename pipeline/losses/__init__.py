"""In-batch contrastive losses (NT-Xent, DCL, HCL, SSCL): pure functions, looked up by name in LOSSES."""
from __future__ import annotations

from typing import Callable

from .functional import dcl, hcl, nt_xent, sscl

LOSSES: dict[str, Callable[..., object]] = {
    "nt_xent": nt_xent,
    "dcl": dcl,
    "hcl": hcl,
    "sscl": sscl,
}

__all__ = ["LOSSES", "dcl", "hcl", "nt_xent", "sscl"]
