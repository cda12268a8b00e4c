"""IL: individual learning. Each network trains on its own labels alone; the cohort only shares the loop and the
data order, so that IL is the fair baseline for every other method."""
from __future__ import annotations

import torch.nn.functional as F

from ._base import Batch, Method, register


@register("il")
class IndividualLearning(Method):
    per_network = True

    def forward(self, batch: Batch) -> dict:
        logits = self.cohort(batch.images, active=batch.active)
        parts = {}
        total = 0.0
        for i in self.cohort.indices:  # every network, or this process's own (train.placement: per-network)
            cls = F.cross_entropy(logits[i], batch.targets[i])
            parts[f"{i}/cls"] = cls
            if batch.active is None or batch.active == i:
                total = total + cls
        return {"loss": total, "logits": logits, "parts": parts}
