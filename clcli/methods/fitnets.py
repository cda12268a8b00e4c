"""FitNets: hint learning (Romero et al. 2015), the paper's HL(1 -> 2). Network 0 is the frozen teacher (as in kd).

The hint is read where the plan puts the first MKB (`plan.sites[0].taps`), recorded by a FeatureRecorder (a
forward hook, or at a graph node that is not a module output the same fx splice that places MKB halves there). A regressor
per student (adaptive pooling when the tap sizes differ, then a 1x1 conv from the student's channels to the
teacher's) maps the student's features onto the teacher's, with an L2 loss:

- stage 1, the first `fitnets.hint_epochs` epochs: loss = hint_weight * L2 only, so only the student's layers up to
  the tap (and the regressor) get gradients;
- stage 2: knowledge distillation exactly as in kd (the hint is still logged, not trained).

The method needs the probe plan (`cohort.plan`, set by build_cohort) and the epoch (`set_epoch`, called by the loop).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clcli import layouts
from clcli.features import FeatureRecorder

from ._base import Batch, register
from .kd import KnowledgeDistillation


def to_nchw(x: torch.Tensor, tap) -> torch.Tensor:
    """A tap's output (NCHW, NHWC or a token grid) as NCHW, without a token grid's prefix tokens."""
    return layouts.to_nchw(x, tap.layout, tap.prefix_tokens, tap.height, tap.width)[0]


def regressor(student_tap, teacher_tap) -> nn.Sequential:
    layers: list[nn.Module] = []
    if student_tap.size != teacher_tap.size:
        layers.append(nn.AdaptiveAvgPool2d(teacher_tap.size))
    layers.append(nn.Conv2d(student_tap.channels, teacher_tap.channels, kernel_size=1))
    return nn.Sequential(*layers)


@register("fitnets")
class FitNets(KnowledgeDistillation):
    recipe_sections = ("kd", "fitnets", "cl")  # the hint is read at the plan's first MKB site

    def __init__(self, cohort, *, kd, fitnets, cl):
        super().__init__(cohort, kd=kd)
        del cl  # a section of its recipe only because the plan (cl.mkbs, cl.embedding, ...) places the hint
        self.hint_weight, self.hint_epochs = fitnets.hint_weight, fitnets.hint_epochs
        plan = getattr(cohort, "plan", None)
        if plan is None or not plan.sites:
            raise ValueError("fitnets needs the cohort's probe plan with at least one site (cohort.plan)")
        self.taps = plan.sites[0].taps
        self.regressors = nn.ModuleList(regressor(tap, self.taps[0]) for tap in self.taps[1:])
        self.regressors.to(next(cohort.parameters()).device)
        self.epoch = 0
        self.recorder = FeatureRecorder()  # network index -> its tap's features in the last forward
        for i, (net, tap) in enumerate(zip(cohort.networks, self.taps)):
            self.recorder.at_tap(i, net, tap.module, tap.node, what="the FitNets hint")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def hint_loss(self, i: int) -> torch.Tensor:
        """L2 between student i's regressed tap features and the teacher's (from the last forward)."""
        student = self.regressors[i - 1](to_nchw(self.recorder[i], self.taps[i]))
        teacher = to_nchw(self.recorder[0], self.taps[0]).detach()
        return F.mse_loss(student.float(), teacher.float())

    def forward(self, batch: Batch) -> dict:
        out = super().forward(batch)  # the KD terms; the recorder keeps the tap features on the way
        hint_stage = self.epoch < self.hint_epochs
        with torch.set_grad_enabled(hint_stage and torch.is_grad_enabled()):
            hints = {i: self.hint_loss(i) for i in range(1, len(self.taps))}
        out["parts"].update({f"{i}/hint": h for i, h in hints.items()})
        if hint_stage:
            out["loss"] = self.hint_weight * sum(hints.values())
        return out
