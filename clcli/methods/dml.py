"""DML: deep mutual learning (Zhang et al. 2018). Every network learns from its labels and from its peers' predictions:

    L_i = CE(z_i, y) + weight * mean_{j != i} KL(p_j || p_i),   p = softmax(z), temperature 1.

The peers' probabilities are detached inside L_i, so summing L_i over the networks trains each network once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from clcli import losses

from ._base import Batch, Method, register


@register("dml")
class DeepMutualLearning(Method):
    recipe_sections = ("dml",)

    def forward(self, batch: Batch) -> dict:
        logits = self.cohort(batch.images, active=batch.active)
        weight = self.recipe.dml.weight
        parts: dict[str, torch.Tensor] = {}
        total = 0.0
        for i, (out, target) in enumerate(zip(logits, batch.targets)):
            cls = F.cross_entropy(out, target)
            kl = losses.soft_target_loss(logits, i, target="peers")
            parts[f"{i}/cls"], parts[f"{i}/kl"] = cls, kl
            if batch.active is None or batch.active == i:
                total = total + cls + weight * kl
        return {"loss": total, "logits": logits, "parts": parts}
