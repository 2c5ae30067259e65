"""What a method is, as the registry holds it, and the config model its settings derive from.

A method is a row of pipeline/methods/__init__.py's METHODS: its ``Settings`` (a pydantic model with
``name: Literal["<name>"]``, pipeline/methods/settings.py) and what trains it. An in-batch method
(InBatchMethod) names a loss function, which InBatchObjective calls with the settings as keyword arguments;
any other method (Method) names its objective class. Both are named as ``"module:attribute"`` and imported
only when a model is built, so this module, the settings and the registry import no torch: the config
validates in a fraction of a second. A plugin or a test may give the function or class itself.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Callable, ClassVar, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pipeline.config import Config

# f(z1, z2, gather, generator) -> scalar loss: an in-batch method's loss with its hyper-parameters bound
LossFn = Callable[["torch.Tensor", "torch.Tensor", Optional[Callable], Optional["torch.Generator"]], "torch.Tensor"]
# (cfg, gather, generator) -> the nn.Module the step loop trains
ObjectiveClass = Callable[["Config", Optional[Callable], Optional["torch.Generator"]], "nn.Module"]

# constraints shared by several methods' settings (each method states its own default)
Temperature = Annotated[float, Field(gt=0.0)]
TauPlus = Annotated[float, Field(ge=0.0, lt=1.0)]  # class prior of false negatives (DCL, HCL, SSCL)
Beta = Annotated[float, Field(ge=0.0)]  # concentration on hard negatives (HCL, SSCL)
NHard = Annotated[int, Field(ge=1)]  # SSCL's s; elsewhere the false-negative-rate diagnostic's "hardest" count


class MethodConfig(BaseModel):
    """The ``loss:`` section of one method: strict (a key of another method is an error), frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    temperature: Temperature = 0.5
    # keys the method reads only for its diagnostics: not listed among its settings (hardneg runs, run notes)
    DIAGNOSTIC_KEYS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def upgrade_stored(cls, loss: dict, stored_format: int) -> dict:
        """A stored ``loss:`` section (a checkpoint's, written at config.CONFIG_FORMAT ``stored_format``) in today's names."""
        return loss

    def label(self) -> str:
        """What runs, tags, notes and tables call this method (its name, unless a setting makes it another)."""
        return self.name

    def batch_problem(self, global_batch: int) -> Optional[str]:
        """Why a global batch of ``global_batch`` samples cannot serve these settings (None: it can)."""
        return None


def resolve(ref: Union[str, Callable]) -> Any:
    """The object a ``"package.module:attribute"`` reference names (imported now); a callable as it is."""
    if callable(ref):
        return ref
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class InBatchMethod:
    """An in-batch method: encoder + projector (InBatchObjective) and ``loss(z1, z2, gather=, **settings)``.

    ``loss`` is called with ``settings.loss_kwargs()`` (its fields but name and the diagnostics-only keys)
    and, when ``draws``, the step's generator as ``generator=`` (SSCL draws its synthetic mixes from it).
    """

    Settings: type[MethodConfig]  # an InBatchConfig
    loss: Union[str, Callable[..., "torch.Tensor"]]  # "module:function", or the function
    draws: bool = False


@dataclass(frozen=True)
class Method:
    """A method with its own objective (queue/bank methods: PSM, MoCHi): ``objective(cfg, gather, generator)``."""

    Settings: type[MethodConfig]
    objective: Union[str, ObjectiveClass]  # "module:Class", or the class
