"""Every method's ``loss:`` section: pydantic models only, so the config validates without torch.

Each model has ``name: Literal["<name>"]`` and the method's own keys; pipeline/methods/__init__.py (the
registry) pairs each with its loss or objective, and ``Config.loss`` is validated by the model its ``name``
selects, so a key of another method is an error naming it. Defaults are the papers' (docs/methods.md).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional

from pydantic import Field, model_validator

from pipeline import console
from pipeline.methods.base import Beta, MethodConfig, NHard, TauPlus


class InBatchConfig(MethodConfig):
    """Settings every in-batch method has: n_hard (the diagnostics' hardest-negative count unless the method uses it).

    The in-batch loss is called with the method's settings as keyword arguments: every field but ``name``
    and the DIAGNOSTIC_KEYS (loss_kwargs), so a new key of a new method reaches its loss with no code.
    """

    n_hard: NHard = 32
    DIAGNOSTIC_KEYS: ClassVar[tuple[str, ...]] = ("n_hard",)

    def loss_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the method's loss: its settings without name and the diagnostics-only keys."""
        skip = {"name", *self.DIAGNOSTIC_KEYS}
        return {k: getattr(self, k) for k in type(self).model_fields if k not in skip}

    def batch_problem(self, global_batch: int) -> Optional[str]:
        """n_hard hardest negatives must exist among an anchor's 2 x batch - 2 (the other views of the global
        batch) where n_hard is the method's own setting (SSCL's s); as a diagnostic's count it is clamped."""
        negatives = 2 * global_batch - 2
        if "n_hard" not in self.DIAGNOSTIC_KEYS and self.n_hard > negatives:
            return (
                f"loss.n_hard={self.n_hard} exceeds the {negatives} negatives per anchor of "
                f"train.global_batch_size={global_batch} (2 x {global_batch} views - 2); set "
                f"train.global_batch_size>={-(-(self.n_hard + 2) // 2)} or loss.n_hard<={negatives}"
            )
        return None

    def beta_for_stats(self) -> float:
        """The hardness weighting the effective-negatives diagnostic assumes (0: uniform)."""
        return 0.0

    def synthetic_for_stats(self) -> tuple[int, Literal["paper", "release"]]:
        """(n_synthetic, mix) of the synthesizer the diagnostics replay (0: none)."""
        return 0, "paper"


class NTXentSettings(InBatchConfig):
    """SimCLR's NT-Xent (Chen et al. 2020, arXiv:2002.05709): the temperature only (n_hard: diagnostics)."""

    name: Literal["nt_xent"] = "nt_xent"


class DCLSettings(InBatchConfig):
    """DCL (Chuang et al. 2020, arXiv:2007.00224): temperature and the class prior tau_plus (n_hard: diagnostics)."""

    name: Literal["dcl"] = "dcl"
    tau_plus: TauPlus = 0.1


class HCLSettings(InBatchConfig):
    """HCL (Robinson et al. 2021, arXiv:2010.04592): temperature, class prior tau_plus, hardness beta."""

    name: Literal["hcl"] = "hcl"
    tau_plus: TauPlus = 0.1
    beta: Beta = 1.0

    def beta_for_stats(self) -> float:
        return self.beta


class SSCLSettings(InBatchConfig):
    """SSCL (Dong et al., arXiv:2304.02971): HCL's settings plus the synthesizer (n_hard = s hardest,
    n_synthetic mixes, mix rule)."""

    name: Literal["sscl"] = "sscl"
    tau_plus: TauPlus = 0.1
    beta: Beta = 1.0
    n_synthetic: int = Field(8, ge=0)
    mix: Literal["paper", "release"] = "paper"
    DIAGNOSTIC_KEYS: ClassVar[tuple[str, ...]] = ()  # n_hard is SSCL's own s

    def beta_for_stats(self) -> float:
        return self.beta

    def synthetic_for_stats(self) -> tuple[int, Literal["paper", "release"]]:
        return self.n_synthetic, self.mix


class PSMSettings(MethodConfig):
    """PSM (Dong et al., arXiv:2311.00358; github.com/dhkdhk/PSM config.conf): the official defaults.
    n_hard: the diagnostics' hardest count."""

    name: Literal["psm"] = "psm"
    n_hard: NHard = 32
    psm_momentum: float = Field(0.99, ge=0.0, le=1.0)  # EMA of the key encoder + projector
    psm_bank_size: int = Field(16384, ge=1)  # FIFO memory bank of momentum keys (view 2)
    psm_n_neighbors: int = Field(5, ge=0)  # K mined positives per key
    psm_accept_a: float = Field(0.5, ge=0.0)  # acceptance p = clip(exp(-a (s_in - s_i+ - b)^2), 0, 0.999)
    psm_accept_b: float = Field(0.0, ge=-2.0, le=2.0)
    # release (default): hard positive weighting (all 1), L_hard's acceptance on raw dot products and its
    # mean over every anchor x negative-sum pair, as github.com/dhkdhk/PSM src/model/psm.py computes them;
    # release_rowwise: the same with L_hard's per-anchor mean (what `release` computed before 2026-12-04);
    # paper: soft weighting, acceptance on cosines, per-anchor mean (docs/methods.md)
    psm_variant: Literal["release", "release_rowwise", "paper"] = "release"
    psm_aa: float = Field(1.0, ge=0.0)  # weight of L_hard
    DIAGNOSTIC_KEYS: ClassVar[tuple[str, ...]] = ("n_hard",)

    @classmethod
    def upgrade_stored(cls, loss: dict, stored_format: int) -> dict:
        """Stored before format 2 (2026-12-04), psm_variant=release ran the per-anchor L_hard: release_rowwise."""
        if stored_format >= 2 or loss.get("psm_variant", "release") != "release":
            return loss
        console.note(
            "this checkpoint's config predates 2026-12-04, when loss.psm_variant=release computed "
            "L_hard's per-anchor mean; loaded as release_rowwise, which computes that (docs/methods.md)"
        )
        return loss | {"psm_variant": "release_rowwise"}

    @model_validator(mode="after")
    def _bank_holds_what_is_mined(self) -> "PSMSettings":
        if self.psm_n_neighbors > self.psm_bank_size:
            raise ValueError(
                f"loss.psm_n_neighbors={self.psm_n_neighbors} must be <= loss.psm_bank_size={self.psm_bank_size}"
            )
        return self


class MoCHiSettings(MethodConfig):
    """MoCHi (Kalantidis et al., NeurIPS 2020, arXiv:2010.01028) on MoCo-v2 (docs/methods.md);
    mochi_n_hard also counts the diagnostics' hardest negatives."""

    name: Literal["mochi"] = "mochi"
    mochi_momentum: float = Field(0.999, ge=0.0, le=1.0)
    mochi_queue_size: int = Field(65536, ge=1)  # MoCo-v2's K (github.com/facebookresearch/moco main_moco.py)
    mochi_n_hard: int = Field(1024, ge=1)  # N hardest queue keys per query (docs/recipes.md: the paper's tables)
    mochi_s: int = Field(1024, ge=0)  # mixes of two hard negatives, alpha ~ U(0, 1)
    mochi_s_prime: int = Field(512, ge=0)  # mixes of the query with a hard negative, beta ~ U(0, 0.5)

    def label(self) -> str:
        """moco_v2 without mixes (mochi_s = mochi_s_prime = 0: Chen et al. 2020, MoCHi's baseline), else mochi."""
        return "moco_v2" if self.mochi_s == 0 and self.mochi_s_prime == 0 else "mochi"

    @model_validator(mode="after")
    def _queue_holds_what_is_mined(self) -> "MoCHiSettings":
        if self.mochi_n_hard > self.mochi_queue_size:
            raise ValueError(
                f"loss.mochi_n_hard={self.mochi_n_hard} must be <= loss.mochi_queue_size={self.mochi_queue_size}"
            )
        return self
