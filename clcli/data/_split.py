"""Hold out a validation set from a training split when the data brings none."""
from __future__ import annotations

import torch

from clcli.errors import ClcliError


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, held-out indices), both sorted: round(fraction * n_c) images of every class c, drawn with
    `seed`. A class with at least 2 images keeps at least one on each side; a class with one image stays in training.
    The draw depends only on (labels, fraction, seed)."""
    if not 0.0 < fraction < 1.0:
        raise ClcliError(f"the validation fraction must be between 0 and 1, got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    held = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        n = len(members)
        k = min(max(round(fraction * n), 1), n - 1) if n >= 2 else 0
        held.append(members[torch.randperm(n, generator=generator)[:k]])
    held_idx = torch.sort(torch.cat(held)).values if held else torch.zeros(0, dtype=torch.int64)
    if len(held_idx) == 0:
        raise ClcliError(f"too few images ({len(labels)}) to hold out a validation set; pass a validation folder")
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held_idx] = False
    return torch.nonzero(mask).flatten(), held_idx
