"""CL: collaborative learning through Mutual Knowledge Bases (the paper's method, section III).

For network i:  L_i = L_cls + alpha * (L_metric + L_verification)                      (Eq 1, 2)
- siamese input: L_metric = D(embed_i, embed_j), or for N networks Eq 5 / Eq 6          (Eq 4 line 1)
- different inputs: L_metric = |D(embed_i, embed_j) - W2^2(x_i, x_j)|^2                 (Eq 4 line 2)
- L_verification: a linear softmax classifier on the embedding against the true labels
summed over the MKB sites. Peers' embeddings are detached inside L_i (clcli.losses), so L_i trains network i's
path; the loop back-propagates sum_i L_i (simultaneous) or L_active (iterative).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from clcli import losses

from ._base import Batch, Method, register


@register("cl")
class CollaborativeLearning(Method):
    uses_mkb = True

    def __init__(self, cohort, recipe):
        super().__init__(cohort, recipe)
        cfg = recipe.cl
        self.alpha, self.metric, self.multi, self.input = cfg.alpha, cfg.metric, cfg.multi, cfg.input
        self.w2_cache = losses.W2Cache(grid=cfg.w2_grid) if cfg.input == "different" else None

    def _metric(self, embeds: list[torch.Tensor], i: int, batch: Batch) -> torch.Tensor:
        if self.input == "siamese":
            return losses.metric_loss(embeds, i, kind=self.metric, multi=self.multi)
        terms = []
        for j in range(len(embeds)):
            if j == i:
                continue
            w2 = self.w2_cache.get(batch.indices[i], batch.indices[j], batch.raw[i], batch.raw[j])
            terms.append(losses.different_input_metric_loss(embeds[i], embeds[j], w2, kind=self.metric))
        return torch.stack(terms).mean()

    def forward(self, batch: Batch) -> dict:
        logits = self.cohort(batch.images, active=batch.active)
        embeds = self.cohort.embeddings()          # {site: [embed per network]}
        parts: dict[str, torch.Tensor] = {}
        total = 0.0
        for i, (out, target) in enumerate(zip(logits, batch.targets)):
            cls = F.cross_entropy(out, target)
            metric = sum(self._metric(e, i, batch) for e in embeds.values())
            verification = sum(
                losses.verification_loss(self.cohort.verifiers[site](e[i].float()), target)
                for site, e in embeds.items()
            )
            parts[f"{i}/cls"], parts[f"{i}/metric"], parts[f"{i}/verification"] = cls, metric, verification
            if batch.active is None or batch.active == i:
                total = total + cls + self.alpha * (metric + verification)
        return {"loss": total, "logits": logits, "parts": parts}
