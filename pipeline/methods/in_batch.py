"""The in-batch family's shared objective (SimCLR / DCL / HCL / SSCL and any method of that shape).

Encoder f + projector g; the loss is the method's bound LossFn over the gathered global batch.
Each in-batch method is a row of the registry: its Settings (an InBatchConfig) and its loss function,
bound by pipeline.objectives.bind_loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.losses import diagnostics
from pipeline.losses.synth import synthesize_hard_negatives
from pipeline.methods.base import LossFn
from pipeline.methods.settings import InBatchConfig
from pipeline.models import build_model

if TYPE_CHECKING:
    from pipeline.config import Config


class InBatchObjective(nn.Module):
    """Encoder f + projector g; ``loss_fn`` (the method's bound loss) over the gathered global batch."""

    def __init__(
        self,
        cfg: Config,
        loss_fn: LossFn,
        gather: Optional[Callable] = None,
        generator: Optional[torch.Generator] = None,
    ):
        super().__init__()
        assert isinstance(cfg.loss, InBatchConfig), type(cfg.loss)
        self.model = build_model(cfg.model, cfg.augment.image_size)
        self.loss_fn = loss_fn
        self.cfg: InBatchConfig = cfg.loss
        self.gather = gather
        self.generator = generator
        self._beta = cfg.loss.beta_for_stats()
        self._n_synthetic, self._mix = cfg.loss.synthetic_for_stats()

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    def forward(
        self, x1: torch.Tensor, x2: torch.Tensor, labels: Optional[torch.Tensor] = None, with_stats: bool = False
    ) -> tuple[torch.Tensor, dict]:
        return self.loss_from(self.embed(x1, x2), self.keys(x1, x2), labels, with_stats)

    def embed(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """The trained side of a batch (or of one chunk): [z1 | z2] (n, 2 proj_dim), one BN group for both views."""
        # One forward over both views: BN sees both and DDP sees one call per backward.
        z1, z2 = self.model(torch.cat([x1, x2])).chunk(2)  # (n, proj_dim) each
        return torch.cat([z1, z2], dim=1)

    def keys(self, x1: torch.Tensor, x2: torch.Tensor) -> Optional[torch.Tensor]:
        """No key branch in the in-batch family: None."""
        return None

    def loss_from(
        self,
        emb: torch.Tensor,
        keys: Optional[torch.Tensor],
        labels: Optional[torch.Tensor] = None,
        with_stats: bool = False,
    ) -> tuple[torch.Tensor, dict]:
        """(loss, stats) of this rank's embeddings ``emb`` (n, 2 proj_dim) against the gathered global batch."""
        z1, z2 = emb.chunk(2, dim=1)  # (n, proj_dim) each
        draws = _fork(self.generator) if with_stats and self._n_synthetic > 0 else None
        loss = self.loss_fn(z1, z2, self.gather, self.generator)
        if not with_stats:
            return loss, {}
        stats = diagnostics.in_batch_stats(
            z1,
            z2,
            temperature=self.cfg.temperature,
            beta=self._beta,
            n_hard=self.cfg.n_hard,
            labels=labels,
            gather=self.gather,
            n_synthetic=self._n_synthetic,
            mix=self._mix,
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
        if self._n_synthetic > 0:
            synthetic = synthesize_hard_negatives(
                sim,
                neg_mask,
                rows,
                ids,
                n_hard=self.cfg.n_hard,
                n_synthetic=self._n_synthetic,
                mix=self._mix,
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
