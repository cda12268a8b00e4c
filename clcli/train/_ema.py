"""An exponential moving average of each network's weights, its MKB half included (timm.utils.ModelEmaV3),
updated after every optimiser step, evaluated each epoch beside the live weights and kept in the checkpoint.

ModelEmaV3 deep-copies the network. The MKB fusion hooks and the feature recorders are bound methods and small
callable objects (clcli.mkb, clcli.features), so the copy's hooks are the copy's own: the EMA network fuses its own
averaged MKB half, never the live one (tests/test_train.py checks an export of the EMA weights against the run's EMA
evaluation)."""
from __future__ import annotations

import torch
from torch import nn


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
