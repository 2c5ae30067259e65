"""PSM (Dong et al., arXiv:2311.00358; github.com/dhkdhk/PSM config.conf, src/model/psm.py): loss.name=psm.

The objective (EMA key branch, memory bank, mined positives) and its diagnostics; the settings (psm_* keys)
are pipeline/methods/settings.py's PSMSettings, the loss math is pipeline/losses/psm.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.backbones import build_backbone
from pipeline.losses import diagnostics
from pipeline.losses.psm import VARIANTS, nearest_neighbors, psm_hard_loss, psm_soft_parts
from pipeline.methods.banks import bank_samples, labels_or_unknown, no_grad_gather, push_keys_, register_key_bank
from pipeline.methods.settings import PSMSettings
from pipeline.models import bn_mlp, ema_update_, momentum_copy

if TYPE_CHECKING:
    from pipeline.config import Config


class PSMObjective(nn.Module):
    """PSM (Dong et al., arXiv:2311.00358): encoder + BN-MLP projector + predictor, EMA key encoder, memory bank.

    Per step: keys of both views from the momentum branch; each key's K nearest bank entries (bank as
    before the step) are its mined positives; the keys and neighbours of the GLOBAL batch are gathered
    (no grad) in rank order, so every rank sees the same columns and enqueues the same view-2 keys:
    the bank stays identical on every rank. loss = 1/2 (L_soft(q1; k2) + L_soft(q2; k1))
    + aa 1/2 (L_hard(q1, k2) + L_hard(q2, k1)). after_step() moves the momentum branch (EMA).
    """

    bank: torch.Tensor  # buffers (register_key_bank): (M, d) unit keys, the write position, labels (M,)
    bank_ptr: torch.Tensor
    bank_labels: torch.Tensor

    def __init__(self, cfg: Config, gather: Optional[Callable] = None, generator: Optional[torch.Generator] = None):
        super().__init__()
        assert isinstance(cfg.loss, PSMSettings), type(cfg.loss)
        m, self.cfg = cfg.model, cfg.loss
        self.encoder, feat_dim = build_backbone(m, cfg.augment.image_size)
        self.projector = bn_mlp(feat_dim, m.proj_hidden_dim, m.proj_dim)
        self.predictor = bn_mlp(m.proj_dim, m.proj_hidden_dim, m.proj_dim)
        self.momentum_encoder = momentum_copy(self.encoder)
        self.momentum_projector = momentum_copy(self.projector)
        register_key_bank(self, "bank", self.cfg.psm_bank_size, m.proj_dim)  # (M, d) unit keys
        self.gather, self.generator = gather, generator
        self._gather_ng = no_grad_gather(gather)

    @property
    def backbone(self) -> nn.Module:
        return self.encoder

    def forward(
        self, x1: torch.Tensor, x2: torch.Tensor, labels: Optional[torch.Tensor] = None, with_stats: bool = False
    ) -> tuple[torch.Tensor, dict]:
        return self.loss_from(self.embed(x1, x2), self.keys(x1, x2), labels, with_stats)

    def embed(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """The trained side of a batch (or of one chunk): [z1_pre | z2_pre | q1 | q2] (n, 4 d)."""
        # The release runs each view through the networks separately (BN statistics per view).
        z1_pre, z2_pre = self.projector(self.encoder(x1)), self.projector(self.encoder(x2))  # (n, d)
        return torch.cat([z1_pre, z2_pre, self.predictor(z1_pre), self.predictor(z2_pre)], dim=1)

    @torch.no_grad()
    def keys(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Momentum keys of both views (n, 2, d), no graph, as the projector gives them (L_hard's raw acceptance
        reads their norms)."""
        k1 = self.momentum_projector(self.momentum_encoder(x1))  # (n, d)
        k2 = self.momentum_projector(self.momentum_encoder(x2))  # (n, d)
        return torch.stack([k1, k2], dim=1)

    def loss_from(
        self, emb: torch.Tensor, raw_keys: torch.Tensor, labels: Optional[torch.Tensor] = None, with_stats: bool = False
    ) -> tuple[torch.Tensor, dict]:
        """(loss, stats) of this rank's embeddings (n, 4 d) and keys (n, 2, d): mined positives, L_soft, L_hard."""
        c, k_nn = self.cfg, self.cfg.psm_n_neighbors
        z1_pre, z2_pre, q1, q2 = emb.chunk(4, dim=1)  # (n, d) each
        k1, k2 = raw_keys[:, 0], raw_keys[:, 1]  # (n, d)
        n, d = q1.shape
        with torch.no_grad():
            keys = F.normalize(raw_keys.float(), dim=-1)  # (n, 2, d)
            nn_vals, nn_idx = nearest_neighbors(keys.reshape(2 * n, d), self.bank, k_nn)  # (2n, K, d), (2n, K)
            keep_local = torch.cat([keys[:, :, None], nn_vals.view(n, 2, k_nn, d)], dim=2)  # (n, 2, K+1, d)
            own = labels_or_unknown(labels, n, q1.device)  # (n,)
            payload = torch.cat(
                [keep_local.reshape(n, -1), own.float()[:, None], self.bank_labels[nn_idx].float().reshape(n, -1)],
                dim=1,
            )
            gathered = self._gather_ng(payload)  # (B, 2 (K+1) d + 1 + 2K): one collective
            n_global, width = gathered.shape[0], 2 * (k_nn + 1) * d
            keep = gathered[:, :width].reshape(n_global, 2, k_nn + 1, d)  # (B, 2, K+1, d)
            all_labels = gathered[:, width].long()  # (B,)
            nn_labels = gathered[:, width + 1 :].long().reshape(n_global, 2, k_nn)  # (B, 2, K)
        offset = int(getattr(self.gather, "rank", 0) or 0) * n
        weighting, acceptance_on, mean_over = VARIANTS[c.psm_variant]
        soft = dict(
            temperature=c.temperature,
            accept_a=c.psm_accept_a,
            accept_b=c.psm_accept_b,
            weighting=weighting,
            row_offset=offset,
            generator=self.generator,
        )
        parts = [psm_soft_parts(q1, z1_pre, keep[:, 1], **soft), psm_soft_parts(q2, z2_pre, keep[:, 0], **soft)]
        loss = 0.5 * (parts[0].loss + parts[1].loss)
        if c.psm_aa > 0:
            hard = dict(
                temperature=c.temperature,
                accept_a=c.psm_accept_a,
                accept_b=c.psm_accept_b,
                generator=self.generator,
                gather=self.gather,
                acceptance_on=acceptance_on,
                mean_over=mean_over,
            )
            loss = loss + c.psm_aa * 0.5 * (psm_hard_loss(q1, k2, **hard) + psm_hard_loss(q2, k1, **hard))
        push_keys_(self, "bank", keep[:, 1, 0], all_labels)  # AFTER the lookup: the global view-2 keys, rank order
        if not with_stats:
            return loss, {}
        col_labels = [torch.cat([all_labels[:, None], nn_labels[:, v]], dim=1).reshape(-1) for v in (1, 0)]
        return loss, _psm_stats(parts, offset, k_nn, own if labels is not None else None, col_labels, c.n_hard)

    @torch.no_grad()
    def similarity_samples(
        self, x1: torch.Tensor, x2: torch.Tensor, labels: Optional[torch.Tensor] = None
    ) -> dict[str, torch.Tensor]:
        """Histogram groups: q1.k2 positives, bank negatives by class, the hardest, and the mined positives."""
        q = self.predictor(self.projector(self.encoder(x1)))  # (n, d)
        k = F.normalize(self.momentum_projector(self.momentum_encoder(x2)).float(), dim=1)  # (n, d)
        samples = bank_samples(q, k, self.bank, self.bank_labels, labels, self.cfg.n_hard)
        if self.cfg.psm_n_neighbors > 0:
            mined, _ = nearest_neighbors(k, self.bank, self.cfg.psm_n_neighbors)  # (n, K, d)
            samples["mined positive"] = torch.einsum("nd,nkd->nk", F.normalize(q.float(), dim=1), mined.float()).ravel()
        return samples

    def after_step(self) -> None:
        """EMA of the key branch (m = loss.psm_momentum), after the optimiser step."""
        ema_update_(self.momentum_encoder, self.encoder, self.cfg.psm_momentum)
        ema_update_(self.momentum_projector, self.projector, self.cfg.psm_momentum)


@torch.no_grad()
def _psm_stats(parts, offset: int, k_nn: int, labels, col_labels, n_hard: int) -> dict:
    """Diagnostics of both L_soft terms: positive, mined, negative cosines, acceptance and label shares."""
    n, n_cols = parts[0].sim.shape
    rows = offset + torch.arange(n, device=parts[0].sim.device)
    negative = (torch.arange(n_cols, device=rows.device) // (k_nn + 1))[None, :] != rows[:, None]  # (n, C)
    sim = torch.cat([p.sim for p in parts])  # (2n, C)
    pos = torch.cat([p.pos_sim for p in parts])  # (2n, K+1)
    cand = torch.cat([negative, negative])
    kept = torch.cat([p.kept for p in parts])
    stats = diagnostics.similarity_summary("pos", pos[:, 0])
    stats |= diagnostics.similarity_summary("mined", pos[:, 1:])
    stats |= diagnostics.similarity_summary("neg", sim, cand)
    stats["sim_neg_hardest"] = diagnostics.hardest_mean(sim, cand)
    stats["accept_rate"] = kept.sum() / cand.sum().clamp(min=1)
    if labels is not None:
        rates = [
            diagnostics.false_negative_rate(p.sim, negative, labels, cl, n_hard)
            for p, cl in zip(parts, col_labels, strict=True)
        ]
        stats["false_neg_rate"] = torch.stack(rates).mean()
        if k_nn > 0:
            mined = torch.stack([cl.view(-1, k_nn + 1)[rows, 1:] for cl in col_labels])  # (2, n, K)
            stats["mined_same_class"] = ((mined == labels[None, :, None]) & (mined >= 0)).float().mean()
    return stats
