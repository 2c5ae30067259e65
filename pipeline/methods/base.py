"""What every method module provides, and the config model its settings derive from.

A method module (pipeline/methods/<name>.py) defines ``Settings`` (a pydantic model with
``name: Literal["<name>"]``, a member of the discriminated union ``Config.loss``), ``IN_BATCH`` and
``build_objective(cfg, gather, generator)``; an in-batch method also defines ``bind_loss(settings)``.
pipeline/methods/__init__.py maps each name to its module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Callable, ClassVar, Optional, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from torch import nn

    from pipeline.config import Config

# f(z1, z2, gather, generator) -> scalar loss: an in-batch method's loss with its hyper-parameters bound
LossFn = Callable[[torch.Tensor, torch.Tensor, Optional[Callable], Optional[torch.Generator]], torch.Tensor]

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


class Method(Protocol):
    """A method module, as the registry holds it."""

    @property
    def Settings(self) -> type[MethodConfig]:  # noqa: N802 -- the module's class of that name
        """The method's ``loss:`` config model: ``name: Literal["<name>"]`` plus its own keys."""

    @property
    def IN_BATCH(self) -> bool:  # noqa: N802 -- a module constant
        """True: the objective has .model and .loss_fn (a LossFn), which bench step times."""

    def build_objective(
        self, cfg: Config, gather: Optional[Callable] = None, generator: Optional[torch.Generator] = None
    ) -> nn.Module: ...
