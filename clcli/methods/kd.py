"""KD: knowledge distillation (Hinton et al. 2015), the paper's DL(1 -> 2). Network 0 is the teacher, trained
before (an IL run) and frozen here; every other network is a student:

    L_i = (1 - w) * CE(z_i, y) + w * T^2 * KL(softmax(z_0 / T) || softmax(z_i / T))

The teacher runs in eval mode without gradients, so its weights and BN statistics stay exactly as loaded and its
test accuracy row is the IL one. Its weights come from `kd.teacher` (an IL run, its checkpoint or an exported file):
training loads them into network 0 (`needs_teacher`); the method itself reads no file. The loop never sets
`batch.active` for methods without MKBs (siamese input only).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clcli import losses
from clcli.errors import ClcliError

from ._base import Batch, Method, register


@register("kd")
class KnowledgeDistillation(Method):
    needs_teacher = True
    recipe_sections = ("kd",)

    def __init__(self, cohort, *, kd):
        super().__init__(cohort)
        if len(cohort.networks) < 2:
            raise ClcliError(f"{self.name} needs a teacher and at least one student: give 2 or more models")
        if not 0.0 <= kd.weight <= 1.0:
            raise ClcliError(f"kd.weight must be between 0 and 1, got {kd.weight}")
        self.weight, self.temperature = kd.weight, kd.temperature
        self.teacher.requires_grad_(False)  # frozen: no gradient, no weight decay, no BN statistics (eval mode)
        self.teacher.eval()

    @property
    def teacher(self) -> nn.Module:
        return self.cohort.networks[0]

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen: BN statistics never move
        return self

    def forward(self, batch: Batch) -> dict:
        self.teacher.eval()
        with torch.no_grad():
            t = self.teacher(batch.images[0])
        logits = [t] + [net(x) for net, x in zip(self.cohort.networks[1:], batch.images[1:])]
        parts: dict[str, torch.Tensor] = {"0/cls": F.cross_entropy(t, batch.targets[0])}
        total = 0.0
        for i in range(1, len(logits)):
            cls = F.cross_entropy(logits[i], batch.targets[i])
            kd = losses.soft_target_loss([logits[i], t], 0, target="peers", temperature=self.temperature)
            parts[f"{i}/cls"], parts[f"{i}/kd"] = cls, kd
            total = total + (1.0 - self.weight) * cls + self.weight * kd
        return {"loss": total, "logits": logits, "parts": parts}
