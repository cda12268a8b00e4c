"""W2^2 between input images (paper Eq 4, second line), solved exactly with POT and cached per image pair.

An image becomes a probability histogram over a coarse grid; the ground cost is the squared distance between grid
cell centres in [0, 1]^2, so every W2^2 lies in [0, 2] whatever the grid or image size.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from clcli.errors import ClcliError

if TYPE_CHECKING:
    import numpy as np
    from torch import Tensor

# Squared diameter of the unit square: with cell centres in [0, 1]^2 no W2^2 can exceed it, for any grid.
W2_MAX = 2.0

# Added to every cell of a [0, 1]-scaled histogram so that a flat image (all zero after the shift) becomes uniform
# instead of empty; small enough to move W2^2 by ~1e-7 at most.
_HIST_EPS = 1e-9


@lru_cache(maxsize=None)
def _ground_cost(grid: int) -> np.ndarray:
    """[grid^2, grid^2] squared distances between cell centres, cells in row-major order (as `flatten` lays them)."""
    import numpy as np
    import ot

    centres = (np.arange(grid, dtype=np.float64) + 0.5) / grid
    rows, cols = np.meshgrid(centres, centres, indexing="ij")
    cost = ot.dist(np.stack([rows.ravel(), cols.ravel()], axis=1), metric="sqeuclidean")
    cost.setflags(write=False)  # shared between calls: nobody may edit it in place
    return cost


def _histograms(x: Tensor, grid: int) -> np.ndarray:
    """[B, C, H, W] images -> [B, grid^2] float64 probability histograms."""
    import torch
    import torch.nn.functional as F

    gray = x.detach().to("cpu", dtype=torch.float64).mean(dim=1, keepdim=True)
    hist = F.adaptive_avg_pool2d(gray, grid).flatten(1)  # area averaging
    # Shift by each image's minimum and scale by its range: the histogram is then the same for uint8, [0, 1] and
    # mean/std-normalised copies of an image, so the cached W2^2 does not depend on the loader's transform.
    hist = hist - hist.min(dim=1, keepdim=True).values
    hist = hist / hist.max(dim=1, keepdim=True).values.clamp_min(1e-12)
    hist = hist + _HIST_EPS
    return (hist / hist.sum(dim=1, keepdim=True)).numpy()


def wasserstein2_sq(x1: Tensor, x2: Tensor, *, grid: int = 8) -> Tensor:
    """W2^2 between paired images x1[k], x2[k] ([B, C, H, W], any float or uint8 range) with POT's exact ot.emd2.

    Each image -> grayscale (mean over channels) -> grid x grid by area averaging -> shifted to be non-negative,
    scaled to [0, 1], plus a tiny epsilon, normalised to sum 1. Ground cost: squared Euclidean distance between cell
    centres in [0, 1]^2. Returns float32 [B] on x1's device, without gradient (the inputs are data).
    """
    import ot
    import torch

    if grid < 1:
        raise ClcliError(f"W2 grid must be at least 1, got {grid}")
    if x1.dim() != 4 or x1.shape != x2.shape:
        raise ValueError(f"images must be [B, C, H, W] batches of one shape, got {tuple(x1.shape)}, {tuple(x2.shape)}")
    cost = _ground_cost(grid)
    h1, h2 = _histograms(x1, grid), _histograms(x2, grid)
    values = [float(ot.emd2(a, b, cost)) for a, b in zip(h1, h2)]
    return torch.tensor(values, dtype=torch.float32, device=x1.device)


class W2Cache:
    """W2^2 per unordered image pair, keyed by dataset indices, so each pair is solved once across epochs.

    `hits` counts lookups answered without solving, `misses` counts pairs solved (a pair repeated inside one batch is
    solved once: one miss, then hits). With `max_entries`, the oldest entries are evicted first (FIFO): simple, and
    with a fixed pairing every pair comes back once per epoch anyway, so recency carries no extra information.
    """

    def __init__(self, *, grid: int = 8, max_entries: int | None = None) -> None:
        if max_entries is not None and max_entries < 1:
            raise ClcliError(f"W2 cache max_entries must be at least 1, got {max_entries}")
        self.grid = grid
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._values: OrderedDict[tuple[int, int], float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._values)

    def get(self, idx1: Tensor, idx2: Tensor, x1: Tensor, x2: Tensor) -> Tensor:
        """W2^2 [B] (float32, on x1's device) for pairs (idx1[k], idx2[k]) with images x1[k], x2[k]."""
        import torch

        keys = [(min(a, b), max(a, b)) for a, b in zip(idx1.tolist(), idx2.tolist())]
        if len(keys) != x1.shape[0]:
            raise ValueError(f"{len(keys)} index pairs for {x1.shape[0]} images")
        # First position of each missing pair; W2 is symmetric, so a swapped pair needs no new solve.
        missing: dict[tuple[int, int], int] = {}
        for pos, key in enumerate(keys):
            if key not in self._values and key not in missing:
                missing[key] = pos
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        # Answer from a local view as well: eviction below may drop pairs this very batch needs.
        solved: dict[tuple[int, int], float] = {}
        if missing:
            pos = torch.tensor(list(missing.values()), device=x1.device)
            values = wasserstein2_sq(x1[pos], x2[pos], grid=self.grid).tolist()
            solved = dict(zip(missing, values))
        out = [solved[k] if k in solved else self._values[k] for k in keys]
        self._values.update(solved)
        self._evict()
        # Via pinned memory to a GPU: the copy does not wait for the work already queued there.
        cuda = x1.device.type == "cuda"
        return torch.tensor(out, dtype=torch.float32, pin_memory=cuda).to(x1.device, non_blocking=cuda)

    def _evict(self) -> None:
        if self.max_entries is None:
            return
        while len(self._values) > self.max_entries:
            self._values.popitem(last=False)

    def state_dict(self) -> dict[str, Any]:
        """Only tensors and ints, so a checkpoint holding it loads with torch.load(weights_only=True)."""
        import torch

        keys = torch.tensor(list(self._values), dtype=torch.long).reshape(-1, 2)
        values = torch.tensor(list(self._values.values()), dtype=torch.float32)
        return {"grid": self.grid, "keys": keys, "values": values, "hits": self.hits, "misses": self.misses}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A different grid gives different W2^2 values: mixing them would silently corrupt the targets.
        if int(state["grid"]) != self.grid:
            raise ClcliError(f"W2 cache was built with grid {int(state['grid'])}, this run uses grid {self.grid}")
        keys = [tuple(k) for k in state["keys"].tolist()]
        self._values = OrderedDict(zip(keys, state["values"].tolist()))
        self.hits = int(state["hits"])
        self.misses = int(state["misses"])
        self._evict()
