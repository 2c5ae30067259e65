"""MoCHi (Kalantidis et al., NeurIPS 2020, arXiv:2010.01028) on MoCo-v2: loss.name=mochi.

No official code was released. With mochi_s = mochi_s_prime = 0 it is plain MoCo-v2 (arXiv:2003.04297).
The objective (query encoder, EMA key encoder, FIFO queue); the settings (mochi_* keys) are
pipeline/methods/settings.py's MoCHiSettings, the loss math is pipeline/losses/mochi.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.losses import diagnostics, tiling
from pipeline.losses.mochi import draw_mixes, mochi_logits, mochi_tiled_mean
from pipeline.methods.banks import bank_samples, labels_or_unknown, no_grad_gather, push_keys_, register_key_bank
from pipeline.methods.settings import MoCHiSettings
from pipeline.models import build_model, ema_update_, momentum_copy

if TYPE_CHECKING:
    from pipeline.config import Config


@torch.no_grad()
def _shuffled_bn_forward(net: nn.Module, x: torch.Tensor, groups: int) -> torch.Tensor:
    """net(x) with BatchNorm over ``groups`` sub-batches of a random permutation, rows back in order (shuffle-BN).

    MoCo (He et al. 2020, github.com/facebookresearch/moco moco/builder.py _batch_shuffle_ddp) shuffles the
    key batch across GPUs so that a query and its key never share BN statistics; this is its single-process
    form, applied within each rank. groups=1: a plain forward. The permutation uses the global RNG (per rank).
    """
    if groups <= 1:
        return net(x)
    perm = torch.randperm(x.shape[0], device=x.device)  # (n,)
    out = torch.cat([net(part) for part in x[perm].chunk(groups)])  # (n, d) in shuffled order
    return torch.empty_like(out).index_copy_(0, perm, out)


class MoCHiObjective(nn.Module):
    """MoCHi (Kalantidis et al., NeurIPS 2020) on MoCo-v2: query encoder, EMA key encoder, FIFO queue.

    With loss.mochi_s = mochi_s_prime = 0 it is plain MoCo-v2. model.shuffle_bn_groups > 1: the query
    encoder's BN runs over sub-batches in order and the key encoder's over sub-batches of a shuffled batch.

    InfoNCE of q (view 1) against its key (view 2), the queue and the synthetic hard negatives mixed
    from each query's hardest queue keys. The GLOBAL keys (no grad, rank order) are enqueued after the
    loss, so the queue is identical on every rank. after_step() moves the key encoder (EMA).
    """

    queue: torch.Tensor  # buffers (register_key_bank): (Q, d) unit keys, the write position, labels (Q,)
    queue_ptr: torch.Tensor
    queue_labels: torch.Tensor

    def __init__(self, cfg: Config, gather: Optional[Callable] = None, generator: Optional[torch.Generator] = None):
        super().__init__()
        assert isinstance(cfg.loss, MoCHiSettings), type(cfg.loss)
        self.cfg, self.bn_groups = cfg.loss, cfg.model.shuffle_bn_groups
        self.encoder = build_model(cfg.model, cfg.augment.image_size)
        self.momentum = momentum_copy(self.encoder)
        register_key_bank(self, "queue", self.cfg.mochi_queue_size, cfg.model.proj_dim)  # (Q, d)
        self.gather, self.generator = gather, generator
        self._gather_ng = no_grad_gather(gather)

    @property
    def backbone(self) -> nn.Module:
        return self.encoder.backbone

    def forward(
        self, x1: torch.Tensor, x2: torch.Tensor, labels: Optional[torch.Tensor] = None, with_stats: bool = False
    ) -> tuple[torch.Tensor, dict]:
        return self.loss_from(self.embed(x1, x2), self.keys(x1, x2), labels, with_stats)

    def embed(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """The trained side of a batch (or of one chunk): queries q (n, d) of view 1, BN per sub-batch."""
        return torch.cat([self.encoder(part) for part in x1.chunk(self.bn_groups)])  # (n, d)

    @torch.no_grad()
    def keys(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Unit momentum keys k (n, d) of view 2 (no graph), shuffle-BN over ``shuffle_bn_groups`` sub-batches."""
        return F.normalize(_shuffled_bn_forward(self.momentum, x2, self.bn_groups).float(), dim=1)  # (n, d)

    def loss_from(
        self, q: torch.Tensor, k: torch.Tensor, labels: Optional[torch.Tensor] = None, with_stats: bool = False
    ) -> tuple[torch.Tensor, dict]:
        """(loss, stats) of this rank's queries q and keys k (n, d) against the queue and the mixes; enqueues."""
        c = self.cfg
        n, d = q.shape
        with torch.no_grad():
            own = labels_or_unknown(labels, n, q.device)
            gathered = self._gather_ng(torch.cat([k, own.float()[:, None]], dim=1))  # (B, d + 1)
        offset = int(getattr(self.gather, "rank", 0) or 0) * n
        draws = draw_mixes(
            q,
            self.queue,
            n_hard=c.mochi_n_hard,
            n_mix=c.mochi_s,
            n_mix_query=c.mochi_s_prime,
            generator=self.generator,
            row_offset=offset,
            n_rows_global=gathered.shape[0],
        )
        logits: Optional[torch.Tensor] = None
        if tiling.tiled(n) is None:
            logits = mochi_logits(q, k, self.queue, draws, temperature=c.temperature)  # (n, 1 + Q + s + s')
            loss = (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
        else:  # row tiles (train.loss_tile): never the whole (n, 1 + Q + s + s') logits with a graph
            loss = mochi_tiled_mean(q, k, self.queue, draws, temperature=c.temperature)
        stats: dict = {}
        if with_stats:
            if logits is None:  # tiled: the diagnostics' whole matrix, without a graph
                logits = mochi_logits(q.detach(), k, self.queue, draws, temperature=c.temperature)
            stats = self._stats(logits.detach() * c.temperature, own if labels is not None else None)
        push_keys_(self, "queue", gathered[:, :d], gathered[:, d].long())  # AFTER the loss: global keys, rank order
        return loss, stats

    @torch.no_grad()
    def _stats(self, sims: torch.Tensor, labels: Optional[torch.Tensor]) -> dict:
        """sims: (n, 1 + Q + m) cosines [positive, queue, synthetic]."""
        size = self.queue.shape[0]
        queue_sims = sims[:, 1 : 1 + size]
        stats = diagnostics.similarity_summary("pos", sims[:, 0])
        stats |= diagnostics.similarity_summary("neg", queue_sims)
        stats |= diagnostics.similarity_summary("syn", sims[:, 1 + size :])
        stats["sim_neg_hardest"] = diagnostics.hardest_mean(queue_sims)
        if labels is not None:
            every = torch.ones_like(queue_sims, dtype=torch.bool)
            stats["false_neg_rate"] = diagnostics.false_negative_rate(
                queue_sims, every, labels, self.queue_labels, self.cfg.mochi_n_hard
            )
        return stats

    @torch.no_grad()
    def similarity_samples(
        self, x1: torch.Tensor, x2: torch.Tensor, labels: Optional[torch.Tensor] = None
    ) -> dict[str, torch.Tensor]:
        """Histogram groups: q.k positives, queue negatives by class, the hardest, and the synthetic mixes."""
        c = self.cfg
        q, k = self.encoder(x1), self.momentum(x2)  # (n, d)
        samples = bank_samples(q, k, self.queue, self.queue_labels, labels, c.mochi_n_hard)
        draws = draw_mixes(
            q,
            self.queue,
            n_hard=c.mochi_n_hard,
            n_mix=c.mochi_s,
            n_mix_query=c.mochi_s_prime,
            generator=torch.Generator(device=q.device).manual_seed(0),
        )  # not the training stream
        sims = mochi_logits(q, k, self.queue, draws, temperature=c.temperature) * c.temperature  # (n, 1 + Q + m)
        samples["synthetic negative"] = sims[:, 1 + self.queue.shape[0] :].ravel()
        return samples

    def after_step(self) -> None:
        """EMA of the key encoder (m = loss.mochi_momentum), after the optimiser step."""
        ema_update_(self.momentum, self.encoder, self.cfg.mochi_momentum)
