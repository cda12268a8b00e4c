"""An exponential moving average of each network's weights, its MKB half included (timm.utils.ModelEmaV3),
updated after every optimiser step, evaluated each epoch beside the live weights and kept in the checkpoint.

ModelEmaV3 deep-copies the network. The MKB fusion hooks and the feature recorders are bound methods and small
callable objects (clcli.mkb, clcli.features), so the copy's hooks are the copy's own: the EMA network fuses its own
averaged MKB half, never the live one (tests/test_train.py checks an export of the EMA weights against the run's EMA
evaluation)."""
from __future__ import annotations

import torch
from torch import nn

from . import _dist
from ._callbacks import Callback, EpochEnd, Loop
from ._evaluation import scores, top1


class CohortEma:
    """One ModelEmaV3 per network of the cohort (train.ema_decay, train.ema_warmup)."""

    def __init__(self, networks: list[nn.Module], cfg):
        from timm.utils import ModelEmaV3

        self.averages = [ModelEmaV3(net, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup) for net in networks]
        for ema in self.averages:
            ema.module.requires_grad_(False)

    @property
    def networks(self) -> list[nn.Module]:
        return [ema.module for ema in self.averages]

    @torch.no_grad()
    def update(self, networks: list[nn.Module], indices: list[int], step: int) -> None:
        """After optimiser step `step` (counted from 1): the networks this process trains, averaged in."""
        for i in indices:
            self.averages[i].update(networks[i], step=step)

    def state_dict(self) -> list[dict]:
        return [ema.module.state_dict() for ema in self.averages]

    def load_state_dict(self, states: list[dict]) -> None:
        for ema, state in zip(self.averages, states):
            ema.module.load_state_dict(state)


class Ema(Callback):
    """train.ema_decay: the averages updated after every step, evaluated on the test images each epoch."""

    key = "ema"

    def __init__(self, cohort, cfg):
        self.ema = CohortEma(cohort.networks, cfg)  # before a checkpoint's weights load: its state replaces them
        self.last: dict[str, float] | None = None

    def on_step_end(self, loop: Loop, window) -> None:
        self.ema.update(loop.cohort.networks, loop.cohort.indices, loop.global_step)

    def on_epoch_end(self, loop: Loop, end: EpochEnd) -> None:
        _dist.sync_averages(self.ema.networks, loop.dist)  # per-network placement: network j's from process j
        self.last = top1(scores(loop, self.ema.networks))
        end.record["ema_test_acc"] = {k: round(v, 3) for k, v in self.last.items()}

    def on_fit_end(self, loop: Loop, summary: dict) -> None:
        summary["ema_test_acc"] = self.last if self.last is not None else top1(scores(loop, self.ema.networks))

    def state_dict(self) -> list[dict]:
        return self.ema.state_dict()

    def load_state_dict(self, state: list[dict]) -> None:
        self.ema.load_state_dict(state)
