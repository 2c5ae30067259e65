"""Pure synthesizer of hard negatives for SSCL (Dong et al., arXiv:2304.02971; github.com/dhkdhk/SSCL).

For each anchor row: the s hardest of its real negatives among the (global) columns, then k mixes
h = normalize(alpha * z_p1 + (1 - alpha) * z_p2), p1, p2 uniform with replacement from those s,
alpha ~ U(0, 1) ("paper"), or h = z_p1 ("release": the official code has the mixing commented out).

Draw protocol (pinned so that every rank reproduces the single-process draws from one seed):
    p = randint(0, s, (2, R_global, k), generator);  alpha = rand((R_global, k, 1), generator)
drawn on the generator's device for ALL R_global = 2B global anchor rows (in the global layout
[view 1 of all ranks; view 2 of all ranks]); each rank keeps the rows of its own anchors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MIX_MODES = ("paper", "release")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_synth_args(n_hard: int, n_synthetic: int, mix: str, generator: torch.Generator | None) -> None:
    """Raise ValueError naming the argument when an SSCL synthesizer argument is out of range."""
    if not _is_int(n_hard) or n_hard < 1:
        raise ValueError(f"n_hard={n_hard!r}; expected an integer >= 1")
    if not _is_int(n_synthetic) or n_synthetic < 0:
        raise ValueError(f"n_synthetic={n_synthetic!r}; expected an integer >= 0")
    if mix not in MIX_MODES:
        raise ValueError(f"mix={mix!r}; expected one of {MIX_MODES}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator={generator!r}; expected a torch.Generator or None")


def draw_mixing(
    n_rows_global: int, n_synthetic: int, n_choices: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Picks p: (2, n_rows_global, k) in [0, n_choices) and alpha: (n_rows_global, k, 1) float32."""
    device = generator.device if generator is not None else torch.device("cpu")
    size = (2, n_rows_global, n_synthetic)
    picks = torch.randint(0, n_choices, size, generator=generator, device=device)  # (2, R_g, k)
    alpha = torch.rand((n_rows_global, n_synthetic, 1), generator=generator, device=device)  # (R_g, k, 1)
    return picks, alpha


def synthesize_hard_negatives(
    sim: Tensor,
    neg_mask: Tensor,
    cols: Tensor,
    row_ids: Tensor,
    *,
    n_hard: int,
    n_synthetic: int,
    mix: str = "paper",
    generator: torch.Generator | None = None,
    n_neg: int | None = None,
    hardness: Tensor | None = None,
    draws: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Detached unit vectors (R, k, d): k mixes of each row's n_hard hardest real negatives (SSCL).

    sim: (R, C) similarities of the local anchor rows to all C = 2B global columns; neg_mask: (R, C)
    True where the column is a real negative of the row (never self or positive); cols: (C, d) unit
    column embeddings; row_ids: (R,) each anchor's own index in the global layout (0 <= id < C).
    n_hard is clamped to the number of real negatives, so self and positive are never picked.
    n_neg: that number when the caller knows it (every row has exactly n_neg), sparing a host sync.
    hardness: (R, C) any increasing function of sim that is -inf off the negatives (the loss's masked
    logits s/t), sparing a masked copy of sim; the picks are the same.
    draws: (picks, alpha) of ``draw_mixing`` for every global row, drawn by the caller (a loss built tile by
    tile draws once for all its rows); None: drawn here from ``generator``.
    """
    check_synth_args(n_hard, n_synthetic, mix, generator)
    n_rows, n_cols = sim.shape  # (R, C)
    if neg_mask.shape != sim.shape or cols.shape[0] != n_cols or row_ids.shape != (n_rows,):
        raise ValueError(
            f"shapes sim={tuple(sim.shape)}, neg_mask={tuple(neg_mask.shape)}, cols={tuple(cols.shape)}, "
            f"row_ids={tuple(row_ids.shape)}; expected (R, C), (R, C), (C, d), (R,)"
        )
    if n_neg is None:
        n_neg = int(neg_mask.sum(dim=1).min()) if n_rows else 0
    if n_neg < 1:
        raise ValueError("synthesize_hard_negatives: some anchor has no real negative (global batch < 2)")
    n_choices = min(n_hard, n_neg)
    bank = cols.detach()  # (C, d)
    if n_synthetic == 0:
        return bank.new_zeros((n_rows, 0, bank.shape[1]))
    if hardness is None:
        hardness = sim.masked_fill(~neg_mask, float("-inf"))  # (R, C)
    hard_cols = hardness.detach().topk(n_choices, dim=1).indices  # (R, s) column ids, hardest first
    picks, alpha = draws if draws is not None else draw_mixing(n_cols, n_synthetic, n_choices, generator)
    picks = picks.to(sim.device)[:, row_ids]  # (2, R, k) this rank's rows
    if mix == "release":
        return F.normalize(bank[hard_cols.gather(1, picks[0])], dim=-1)  # (R, k, d)
    alpha = alpha.to(device=sim.device, dtype=bank.dtype)[row_ids]  # (R, k, 1)
    both = bank[hard_cols.gather(1, torch.cat([picks[0], picks[1]], dim=1))]  # (R, 2k, d): one gather for z_a, z_b
    z_a, z_b = both[:, :n_synthetic], both[:, n_synthetic:]  # (R, k, d) each
    return F.normalize(torch.lerp(z_b, z_a, alpha), dim=-1)  # alpha z_a + (1 - alpha) z_b: (R, k, d)
