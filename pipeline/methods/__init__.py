"""The method table: ``loss.name`` -> the module that owns the method's config, objective and loss.

Adding a method is one module here (docs/methods.md, "Adding a method") plus one line in METHODS.
Config.loss is the discriminated union of the Settings of every module below, so a loss key of
another method is an error naming it.
"""

from __future__ import annotations

from pipeline.errors import HardnegError
from pipeline.methods import dcl, hcl, mochi, nt_xent, psm, sscl
from pipeline.methods.base import Method

METHODS: dict[str, Method] = {
    "nt_xent": nt_xent,
    "dcl": dcl,
    "hcl": hcl,
    "sscl": sscl,
    "psm": psm,
    "mochi": mochi,  # with loss.mochi_s = mochi_s_prime = 0: MoCo-v2
}
DEFAULT_METHOD = "nt_xent"  # what loss.name is when a config does not say


def method(name: str) -> Method:
    """The module registered for ``loss.name=name`` (HardnegError naming the registered ones otherwise)."""
    try:
        return METHODS[name]
    except KeyError:
        raise HardnegError(f"no method loss.name={name!r}; registered: {', '.join(METHODS)}") from None
