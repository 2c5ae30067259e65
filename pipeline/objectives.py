"""Objectives: a module that owns everything a method trains (encoder, heads, queues) and its loss.

``forward(x1, x2, labels=None, with_stats=False) -> (loss, stats)`` is all the step loop sees, so
SimCLR-family, PSM and MoCHi differ only here. ``after_step()`` runs after the optimiser step
(momentum updates). ``backbone`` is what evaluation uses. Gather and generator are injected.
With ``with_stats`` the objective also returns its diagnostics (pipeline/losses/diagnostics.py) as
{name: 0-dim tensor}, the same names on every rank; computing them draws nothing from any generator.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Config, LossConfig
from pipeline.losses import LOSSES, diagnostics
from pipeline.losses.mochi import draw_mixes, mochi_logits
from pipeline.losses.psm import VARIANTS, fifo_enqueue, nearest_neighbors, psm_hard_loss, psm_soft_parts
from pipeline.losses.synth import synthesize_hard_negatives
from pipeline.models import bn_mlp, build_backbone, build_model, ema_update_, momentum_copy


def bind_loss(cfg: LossConfig) -> Callable:
    """The configured in-batch loss as f(z1, z2, gather, generator) -> scalar, hyper-parameters bound."""
    fn = LOSSES[cfg.name]
    kwargs = {"temperature": cfg.temperature}
    if cfg.name in ("dcl", "hcl", "sscl"):
        kwargs["tau_plus"] = cfg.tau_plus
    if cfg.name in ("hcl", "sscl"):
        kwargs["beta"] = cfg.beta
    if cfg.name == "sscl":
        kwargs.update(n_hard=cfg.n_hard, n_synthetic=cfg.n_synthetic, mix=cfg.mix)
        return lambda z1, z2, gather, generator: fn(z1, z2, gather=gather, generator=generator, **kwargs)
    return lambda z1, z2, gather, generator: fn(z1, z2, gather=gather, **kwargs)


class InBatchObjective(nn.Module):
    """SimCLR / DCL / HCL / SSCL: encoder f + projector g, loss over the gathered global batch."""

    def __init__(self, cfg: Config, gather: Optional[Callable] = None, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.model = build_model(cfg.model)
        self.loss_fn = bind_loss(cfg.loss)
        self.cfg = cfg.loss
        self.gather = gather
        self.generator = generator

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    def forward(
        self, x1: torch.Tensor, x2: torch.Tensor, labels: Optional[torch.Tensor] = None, with_stats: bool = False
    ) -> tuple[torch.Tensor, dict]:
        # One forward over both views: BN sees both and DDP sees one call per backward.
        z1, z2 = self.model(torch.cat([x1, x2])).chunk(2)  # (n, proj_dim) each
        draws = _fork(self.generator) if with_stats and self.cfg.name == "sscl" else None
        loss = self.loss_fn(z1, z2, self.gather, self.generator)
        if not with_stats:
            return loss, {}
        c = self.cfg
        stats = diagnostics.in_batch_stats(
            z1,
            z2,
            temperature=c.temperature,
            beta=c.beta if c.name in ("hcl", "sscl") else 0.0,
            n_hard=c.n_hard,
            labels=labels,
            gather=self.gather,
            n_synthetic=c.n_synthetic if c.name == "sscl" else 0,
            mix=c.mix,
            generator=draws,
        )
        return loss, stats

    def after_step(self) -> None:
        """Nothing to update outside the optimiser for the in-batch family."""

    @torch.no_grad()
    def similarity_samples(
        self, x1: torch.Tensor, x2: torch.Tensor, labels: Optional[torch.Tensor] = None
    ) -> dict[str, torch.Tensor]:
        """Cosines on this batch for the histogram: positives, negatives (split by class where labels are
        known), each anchor's n_hard hardest negatives and (SSCL) the synthetic negatives."""
        z1, z2 = F.normalize(self.model(torch.cat([x1, x2])).float(), dim=1).chunk(2)  # (n, d) each
        rows = torch.cat([z1, z2])  # (2n, d): this rank's batch only; a histogram needs no global view
        n2 = rows.shape[0]
        ids = torch.arange(n2, device=rows.device)
        sim = rows @ rows.T  # (2n, 2n)
        neg_mask = (ids[:, None] != ids[None, :]) & (ids[None, :] != (ids[:, None] + n2 // 2) % n2)
        samples = {"positive": (z1 * z2).sum(dim=1)}
        if labels is not None:
            both = torch.cat([labels, labels]).to(rows.device)  # (2n,)
            same = (both[:, None] == both[None, :]) & (both[:, None] >= 0)  # (2n, 2n)
            samples["same-class negative"] = sim[neg_mask & same]
            samples["other-class negative"] = sim[neg_mask & ~same]
        else:
            samples["negative"] = sim[neg_mask]
        k = min(self.cfg.n_hard, int(neg_mask.sum(dim=1).min()))
        hardest = sim.masked_fill(~neg_mask, float("-inf")).topk(k, dim=1).values  # (2n, k)
        samples[f"{k} hardest negatives per anchor"] = hardest.ravel()
        if self.cfg.name == "sscl" and self.cfg.n_synthetic > 0:
            synthetic = synthesize_hard_negatives(
                sim,
                neg_mask,
                rows,
                ids,
                n_hard=self.cfg.n_hard,
                n_synthetic=self.cfg.n_synthetic,
                mix=self.cfg.mix,
                generator=torch.Generator(device=rows.device).manual_seed(0),
            )  # (2n, k, d)
            samples["synthetic negative"] = (rows[:, None, :] * synthetic).sum(dim=-1).ravel()
        return samples


def _fork(generator: Optional[torch.Generator]) -> torch.Generator:
    """A generator in the state of ``generator`` (the global CPU RNG's when None); drawing from it moves neither."""
    if generator is None:
        twin = torch.Generator()
        twin.set_state(torch.get_rng_state())
        return twin
    twin = torch.Generator(device=generator.device)
    twin.set_state(generator.get_state())
    return twin


def _no_grad_gather(gather: Optional[Callable]) -> Callable:
    """The injected gather applied to detached tensors (rank order, no graph); identity without one."""
    if gather is None:
        return lambda x: x.detach()
    return lambda x: gather(x.detach())


def _random_bank(size: int, dim: int) -> torch.Tensor:
    """(size, dim) random unit rows, the MoCo / lightly initial queue (global RNG: equal on every rank)."""
    return F.normalize(torch.randn(size, dim), dim=1)


def _register_key_bank(module: nn.Module, name: str, size: int, dim: int) -> None:
    """Buffers of a FIFO bank of keys: ``name`` (size, dim) random unit keys, ``name_ptr``, ``name_labels`` (-1)."""
    module.register_buffer(name, _random_bank(size, dim))
    module.register_buffer(f"{name}_ptr", torch.zeros((), dtype=torch.long))
    module.register_buffer(f"{name}_labels", torch.full((size,), -1, dtype=torch.long))


@torch.no_grad()
def _push_keys_(module: nn.Module, name: str, keys: torch.Tensor, labels: torch.Tensor) -> None:
    """Enqueue keys (n, d) and their labels (n,) into the bank ``name`` in place (a ring: see fifo_enqueue)."""
    bank, bank_labels, bank_ptr = (
        getattr(module, name),
        getattr(module, f"{name}_labels"),
        getattr(module, f"{name}_ptr"),
    )
    ptr = int(bank_ptr)
    new_bank, new_ptr = fifo_enqueue(bank, ptr, keys)
    new_labels, _ = fifo_enqueue(bank_labels[:, None], ptr, labels[:, None])
    bank.copy_(new_bank)
    bank_labels.copy_(new_labels[:, 0])
    bank_ptr.fill_(new_ptr)


def _labels_or_unknown(labels: Optional[torch.Tensor], n: int, device) -> torch.Tensor:
    return labels.reshape(-1).long() if labels is not None else torch.full((n,), -1, dtype=torch.long, device=device)


@torch.no_grad()
def _bank_samples(
    q: torch.Tensor,
    k: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    labels: Optional[torch.Tensor],
    n_hard: int,
) -> dict[str, torch.Tensor]:
    """Histogram groups of a queue/bank method: q.k positives, bank negatives by class, the n_hard hardest.

    q, k: (n, d) queries and their momentum keys; bank: (M, d) unit keys with labels (M,) (-1: unknown).
    """
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    sims = q @ bank.float().T  # (n, M)
    samples = {"positive": (q * k).sum(dim=1)}
    if labels is not None:
        own = labels.to(q.device)[:, None]  # (n, 1)
        known = (bank_labels >= 0)[None, :].expand_as(sims)  # (n, M)
        same = (bank_labels[None, :] == own) & known
        samples["same-class negative"] = sims[same]
        samples["other-class negative"] = sims[known & ~same]
        samples["negative of unknown class (bank warm-up)"] = sims[~known]
    else:
        samples["negative"] = sims.ravel()
    hard = min(n_hard, sims.shape[1])
    samples[f"{hard} hardest negatives per anchor"] = sims.topk(hard, dim=1).values.ravel()
    return samples


class PSMObjective(nn.Module):
    """PSM (Dong et al., arXiv:2311.00358): encoder + BN-MLP projector + predictor, EMA key encoder, memory bank.

    Per step: keys of both views from the momentum branch; each key's K nearest bank entries (bank as
    before the step) are its mined positives; the keys and neighbours of the GLOBAL batch are gathered
    (no grad) in rank order, so every rank sees the same columns and enqueues the same view-2 keys:
    the bank stays identical on every rank. loss = 1/2 (L_soft(q1; k2) + L_soft(q2; k1))
    + aa 1/2 (L_hard(q1, k2) + L_hard(q2, k1)). after_step() moves the momentum branch (EMA).
    """

    def __init__(self, cfg: Config, gather: Optional[Callable] = None, generator: Optional[torch.Generator] = None):
        super().__init__()
        m, self.cfg = cfg.model, cfg.loss
        self.encoder, feat_dim = build_backbone(m.backbone, m.stem, m.width, m.stem_maxpool)
        self.projector = bn_mlp(feat_dim, m.proj_hidden_dim, m.proj_dim)
        self.predictor = bn_mlp(m.proj_dim, m.proj_hidden_dim, m.proj_dim)
        self.momentum_encoder = momentum_copy(self.encoder)
        self.momentum_projector = momentum_copy(self.projector)
        _register_key_bank(self, "bank", cfg.loss.psm_bank_size, m.proj_dim)  # (M, d) unit keys
        self.gather, self.generator = gather, generator
        self._gather_ng = _no_grad_gather(gather)

    @property
    def backbone(self) -> nn.Module:
        return self.encoder

    def forward(
        self, x1: torch.Tensor, x2: torch.Tensor, labels: Optional[torch.Tensor] = None, with_stats: bool = False
    ) -> tuple[torch.Tensor, dict]:
        c, k_nn = self.cfg, self.cfg.psm_n_neighbors
        # The release runs each view through the networks separately (BN statistics per view).
        z1_pre, z2_pre = self.projector(self.encoder(x1)), self.projector(self.encoder(x2))  # (n, d)
        q1, q2 = self.predictor(z1_pre), self.predictor(z2_pre)  # (n, d)
        n, d = q1.shape
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_encoder(x1))  # (n, d)
            k2 = self.momentum_projector(self.momentum_encoder(x2))  # (n, d)
            keys = F.normalize(torch.stack([k1, k2], dim=1).float(), dim=-1)  # (n, 2, d)
            nn_vals, nn_idx = nearest_neighbors(keys.reshape(2 * n, d), self.bank, k_nn)  # (2n, K, d), (2n, K)
            keep_local = torch.cat([keys[:, :, None], nn_vals.view(n, 2, k_nn, d)], dim=2)  # (n, 2, K+1, d)
            own = _labels_or_unknown(labels, n, q1.device)  # (n,)
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
        weighting, acceptance_on = VARIANTS[c.psm_variant]
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
            )
            loss = loss + c.psm_aa * 0.5 * (psm_hard_loss(q1, k2, **hard) + psm_hard_loss(q2, k1, **hard))
        _push_keys_(self, "bank", keep[:, 1, 0], all_labels)  # AFTER the lookup: the global view-2 keys, rank order
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
        samples = _bank_samples(q, k, self.bank, self.bank_labels, labels, self.cfg.n_hard)
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
            diagnostics.false_negative_rate(p.sim, negative, labels, cl, n_hard) for p, cl in zip(parts, col_labels)
        ]
        stats["false_neg_rate"] = torch.stack(rates).mean()
        if k_nn > 0:
            mined = torch.stack([cl.view(-1, k_nn + 1)[rows, 1:] for cl in col_labels])  # (2, n, K)
            stats["mined_same_class"] = ((mined == labels[None, :, None]) & (mined >= 0)).float().mean()
    return stats


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

    def __init__(self, cfg: Config, gather: Optional[Callable] = None, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.cfg, self.bn_groups = cfg.loss, cfg.model.shuffle_bn_groups
        self.encoder = build_model(cfg.model)
        self.momentum = momentum_copy(self.encoder)
        _register_key_bank(self, "queue", cfg.loss.mochi_queue_size, cfg.model.proj_dim)  # (Q, d)
        self.gather, self.generator = gather, generator
        self._gather_ng = _no_grad_gather(gather)

    @property
    def backbone(self) -> nn.Module:
        return self.encoder.backbone

    def forward(
        self, x1: torch.Tensor, x2: torch.Tensor, labels: Optional[torch.Tensor] = None, with_stats: bool = False
    ) -> tuple[torch.Tensor, dict]:
        c = self.cfg
        q = torch.cat([self.encoder(part) for part in x1.chunk(self.bn_groups)])  # (n, d): BN per sub-batch
        n, d = q.shape
        with torch.no_grad():
            k = F.normalize(_shuffled_bn_forward(self.momentum, x2, self.bn_groups).float(), dim=1)  # (n, d)
            own = _labels_or_unknown(labels, n, q.device)
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
        logits = mochi_logits(q, k, self.queue, draws, temperature=c.temperature)  # (n, 1 + Q + s + s')
        loss = (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
        stats = self._stats(logits.detach() * c.temperature, own if labels is not None else None) if with_stats else {}
        _push_keys_(self, "queue", gathered[:, :d], gathered[:, d].long())  # AFTER the loss: global keys, rank order
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
        samples = _bank_samples(q, k, self.queue, self.queue_labels, labels, c.mochi_n_hard)
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


OBJECTIVES = {
    "nt_xent": InBatchObjective,
    "dcl": InBatchObjective,
    "hcl": InBatchObjective,
    "sscl": InBatchObjective,
    "psm": PSMObjective,
    "mochi": MoCHiObjective,
}


def build_objective(
    cfg: Config, gather: Optional[Callable] = None, generator: Optional[torch.Generator] = None
) -> nn.Module:
    """The objective module the config's loss.name selects."""
    return OBJECTIVES[cfg.loss.name](cfg, gather, generator)
