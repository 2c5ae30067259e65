"""Training diagnostics of contrastive losses: pure, no gradient, a few reductions over the similarity matrix.

- sim_<kind>_mean / sim_<kind>_max: mean and max cosine over this rank's (anchor, candidate) pairs of a
  kind: positives, real negatives, synthetic negatives (SSCL/MoCHi) ...; sim_neg_hardest: mean over
  anchors of their hardest real negative.
- eff_negatives: mean over anchors of exp(entropy of the HCL weights w_ij = softmax_j(beta s_ij / t))
  over the real negatives: N for beta = 0, towards 1 as beta grows.
- false_neg_rate: where labels are known, the share of same-class samples among each anchor's n_hard
  hardest real negatives (the false negatives the debiasing term tau+ is meant to correct).
The loop averages each value over ranks (so a *_max is the mean of the per-rank maxima).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .functional import Gather, _batch
from .precision import full_precision
from .synth import synthesize_hard_negatives


@torch.no_grad()
def similarity_summary(kind: str, values: Tensor, valid: Optional[Tensor] = None) -> dict[str, Tensor]:
    """{"sim_<kind>_mean", "sim_<kind>_max"} over the entries of ``values`` where ``valid`` (all when None)."""
    values = values.detach().float()
    if valid is None:
        valid = torch.ones_like(values, dtype=torch.bool)
    count = valid.sum()
    if values.numel() == 0:
        zero = values.new_zeros(())
        return {f"sim_{kind}_mean": zero, f"sim_{kind}_max": zero}
    mean = torch.where(valid, values, 0.0).sum() / count.clamp(min=1)
    top = torch.where(valid, values, float("-inf")).max()
    return {f"sim_{kind}_mean": mean, f"sim_{kind}_max": torch.where(count > 0, top, 0.0)}


@torch.no_grad()
def hardest_mean(values: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Mean over rows (with a valid entry) of the row maximum: values (R, C) -> 0-dim."""
    values = values.detach().float()
    if valid is not None:
        values = torch.where(valid, values, float("-inf"))
    top = values.amax(dim=1)  # (R,)
    ok = torch.isfinite(top)
    return torch.where(ok, top, 0.0).sum() / ok.sum().clamp(min=1)


@torch.no_grad()
def effective_negatives(logits: Tensor, beta: float, valid: Optional[Tensor] = None) -> Tensor:
    """mean_i exp(H(w_i.)), w_ij = softmax_j(beta * logits_ij) over valid j; logits = s / t: (R, N) -> 0-dim."""
    x = beta * logits.detach().double()  # (R, N)
    if valid is not None:
        x = torch.where(valid, x, float("-inf"))
    lse = torch.logsumexp(x, dim=1, keepdim=True)  # (R, 1)
    w = torch.exp(x - lse)  # (R, N); 0 where invalid
    entropy = lse.squeeze(1) - torch.where(w > 0, w * x, 0.0).sum(dim=1)  # (R,)
    return torch.exp(entropy).mean().float()


@torch.no_grad()
def false_negative_rate(sim: Tensor, neg_mask: Tensor, row_labels: Tensor, col_labels: Tensor, n_hard: int) -> Tensor:
    """Share of same-label columns among each row's n_hard most similar negatives: (R, C) -> 0-dim.

    n_hard is clamped to the smallest number of negatives of a row; labels < 0 (unknown) never match,
    and rows of unknown label (e.g. STL-10's unlabeled split) are left out of the mean (0 if none is left).
    """
    n_neg = int(neg_mask.sum(dim=1).min()) if sim.shape[0] else 0
    k = min(int(n_hard), n_neg)
    if k < 1:
        return sim.new_zeros((), dtype=torch.float32)
    idx = sim.detach().masked_fill(~neg_mask, float("-inf")).topk(k, dim=1).indices  # (R, k)
    picked = col_labels.to(sim.device)[idx]  # (R, k)
    rows = row_labels.to(sim.device)  # (R,)
    same = (picked == rows[:, None]) & (picked >= 0)  # (R, k)
    known = rows >= 0  # (R,)
    return (same.float().mean(dim=1) * known).sum() / known.sum().clamp(min=1)


@full_precision
@torch.no_grad()
def in_batch_stats(
    z1: Tensor,
    z2: Tensor,
    *,
    temperature: float,
    beta: float,
    n_hard: int,
    labels: Optional[Tensor] = None,
    gather: Optional[Gather] = None,
    n_synthetic: int = 0,
    mix: str = "paper",
    generator: Optional[torch.Generator] = None,
) -> dict[str, Tensor]:
    """Diagnostics of the in-batch family on local rows vs gathered columns (the losses' layout).

    z1, z2: (n, d) projections; labels: (n,) class ids or None; gather: the losses' gather (it is
    applied to detached tensors, so no graph is built). For SSCL pass n_synthetic > 0 and a generator
    in the state the loss drew from (a clone: this consumes it), to see the very synthetic negatives used.
    """
    b = _batch(z1.detach(), z2.detach(), temperature, gather)
    sim = b.sim  # (R, C)
    n_rows, n_cols = sim.shape
    pos_ids = (b.row_ids + n_cols // 2) % n_cols  # (R,)
    stats = similarity_summary("pos", sim.gather(1, pos_ids[:, None]).squeeze(1))
    stats |= similarity_summary("neg", sim, b.neg_mask)
    stats["sim_neg_hardest"] = hardest_mean(sim, b.neg_mask)
    stats["eff_negatives"] = effective_negatives(b.logits, beta, b.neg_mask)
    if n_synthetic > 0:  # picked from the loss's own masked logits, so the draws are the loss's
        h = synthesize_hard_negatives(
            b.logits,
            b.neg_mask,
            b.cols,
            b.row_ids,
            n_hard=n_hard,
            n_synthetic=n_synthetic,
            mix=mix,
            generator=generator,
            n_neg=b.n_neg,
            hardness=b.neg,
        )  # (R, k, d)
        stats |= similarity_summary("syn", torch.einsum("rd,rkd->rk", b.rows, h))
    if labels is not None:
        local = labels.detach().reshape(-1, 1)  # (n, 1)
        gathered = (gather(local) if gather is not None else local).reshape(-1)  # (B,)
        stats["false_neg_rate"] = false_negative_rate(
            sim, b.neg_mask, torch.cat([local.reshape(-1)] * 2), torch.cat([gathered, gathered]), n_hard
        )
    return stats
