"""The method table: ``loss.name`` -> the method's settings and what trains it; nothing else names methods.

An in-batch method is its Settings (pipeline/methods/settings.py) and its loss function from
pipeline/losses/, which InBatchObjective calls with the settings as keyword arguments; a queue/bank
method names its objective class. Adding a method is its Settings and its loss (or objective) plus one
line here (docs/methods.md, "Adding a method"). The table imports no torch (the references are imported
when a model is built), so ``pipeline.config`` validates without it. ``Config.loss`` is validated by the
Settings its ``name`` selects, looked up here at validation time: a row added at run time (a plugin,
tests/toy_method.py) is a method at once.
"""

from __future__ import annotations

from typing import Union

from pipeline.errors import HardnegError
from pipeline.methods.base import InBatchMethod, Method
from pipeline.methods.settings import (
    DCLSettings,
    HCLSettings,
    MoCHiSettings,
    NTXentSettings,
    PSMSettings,
    SSCLSettings,
)

_LOSSES = "pipeline.losses.functional"

METHODS: dict[str, Union[InBatchMethod, Method]] = {
    "nt_xent": InBatchMethod(NTXentSettings, f"{_LOSSES}:nt_xent"),  # SimCLR, Chen et al. 2020
    "dcl": InBatchMethod(DCLSettings, f"{_LOSSES}:dcl"),  # Chuang et al. 2020
    "hcl": InBatchMethod(HCLSettings, f"{_LOSSES}:hcl"),  # Robinson et al. 2021
    "sscl": InBatchMethod(SSCLSettings, f"{_LOSSES}:sscl", draws=True),  # Dong et al. 2023
    "psm": Method(PSMSettings, "pipeline.methods.psm:PSMObjective"),  # Dong et al. 2023
    "mochi": Method(MoCHiSettings, "pipeline.methods.mochi:MoCHiObjective"),  # with mochi_s = s' = 0: MoCo-v2
}
DEFAULT_METHOD = "nt_xent"  # what loss.name is when a config does not say


def method(name: str) -> Union[InBatchMethod, Method]:
    """The row registered for ``loss.name=name`` (HardnegError naming the registered ones otherwise)."""
    try:
        return METHODS[name]
    except KeyError:
        raise HardnegError(f"no method loss.name={name!r}; registered: {', '.join(METHODS)}") from None
