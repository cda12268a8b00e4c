from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from clcli.errors import ClcliError

METHODS: dict[str, type["Method"]] = {}


def register(name: str):
    def wrap(cls):
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


@dataclass
class Batch:
    images: list[torch.Tensor]      # one normalised batch per network (the same tensor for siamese input)
    targets: list[torch.Tensor]
    indices: list[torch.Tensor]     # dataset indices, for caches keyed by image (W2)
    raw: list[torch.Tensor]         # the uint8 augmented images, for input-space distances (W2)
    active: int | None = None       # iterative training: the one network updated this step


class Method(nn.Module):
    """Base: owns the cohort, so that `parameters()` of the method is everything the optimiser trains."""

    name = "base"
    uses_mkb = False          # build the networks with MKB halves attached
    shared_transfer = True    # one space transfer per site shared by all networks (False: one per network)
    # Computes only the networks in `cohort.indices` (train.placement: per-network, one network per process), and
    # every trainable parameter gets a gradient in a simultaneous step (DDP need not look for unused ones).
    per_network = False
    # The method sections of the recipe (cl, kd, dml, fitnets, wel) it reads: `clcli compare` reuses a finished run
    # when only other methods' sections changed (e.g. a CL variant reuses the IL runs of its seed).
    recipe_sections: tuple[str, ...] = ()

    def __init__(self, cohort, recipe):
        super().__init__()
        self.cohort = cohort
        self.recipe = recipe

    def forward(self, batch: Batch) -> dict:
        raise NotImplementedError


METHOD_SECTIONS = ("cl", "kd", "dml", "fitnets", "wel")


def create(name: str, cohort, recipe) -> Method:
    if name not in METHODS:
        raise ClcliError(f"unknown method '{name}'; available: {', '.join(sorted(METHODS))}")
    return METHODS[name](cohort, recipe)


def uses_mkb(name: str) -> bool:
    if name not in METHODS:
        raise ClcliError(f"unknown method '{name}'; available: {', '.join(sorted(METHODS))}")
    return METHODS[name].uses_mkb
