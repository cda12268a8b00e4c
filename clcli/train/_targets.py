"""Soft training targets: label smoothing and mixup / cutmix through timm (`timm.data.Mixup`,
`timm.data.mixup.mixup_target`). The methods see them only as the batch's targets ([B] class indices, or [B, C]
probabilities that `F.cross_entropy` takes as they are)."""
from __future__ import annotations

import hashlib

import numpy as np
import torch


def _seed(seed: int, epoch: int, step: int) -> int:
    digest = hashlib.sha256(f"clcli.mix:{int(seed)}:{int(epoch)}:{int(step)}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class TargetMixer:
    """One mix per training batch, shared by the whole cohort (siamese input): timm's Mixup (mixup, cutmix, their
    switch and probability, per batch, pair or element), or label smoothing alone. timm's Mixup draws lambda, the
    choice of mixup or cutmix and the cut box from NumPy's global generator; each batch's draws come from that
    generator seeded by (seed, epoch, step) and its state is put back afterwards, so `--resume` repeats them exactly
    and nothing else's random numbers move. The pairing is timm's: each image with its mirror in the batch."""

    def __init__(self, cfg, num_classes: int):
        self.num_classes, self.smoothing, self.seed = num_classes, cfg.label_smoothing, cfg.seed
        self.mixup = None
        if cfg.mixing:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                               switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                               label_smoothing=cfg.label_smoothing, num_classes=num_classes)

    @property
    def active(self) -> bool:
        return self.mixup is not None or self.smoothing > 0

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, *, epoch: int,
                 step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, soft targets [B, C]) for one normalised batch; the images mixed in place by timm."""
        if self.mixup is None:
            from timm.data.mixup import mixup_target

            return images, mixup_target(targets, self.num_classes, lam=1.0, smoothing=self.smoothing)
        saved = np.random.get_state()
        np.random.seed(_seed(self.seed, epoch, step))
        try:
            return self.mixup(images, targets)
        finally:
            np.random.set_state(saved)


def hard_labels(targets: torch.Tensor) -> torch.Tensor:
    """Class indices of hard or soft targets (a mixed target's larger part): what training accuracy counts."""
    return targets.argmax(1) if targets.dim() > 1 else targets
