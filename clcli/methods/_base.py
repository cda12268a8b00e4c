from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from clcli.errors import ClcliError

METHODS: dict[str, type["Method"]] = {}
# Names that are rows of a comparison but not methods one trains: asked to train them, say where they come from.
NOT_TRAINED = {"el": "el (ensemble learning) is not trained: it is computed from the IL runs by "
                     "`clcli compare --methods il,el,...` (or clcli.compare.el_accuracy(<IL run>))"}


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
    """Base: owns the cohort, so that `parameters()` of the method is everything the optimiser trains.

    A method takes the cohort and, as keyword arguments, the recipe sections it names in `recipe_sections` (typed:
    `cl=CLConfig`, `kd=KDConfig`, ...); it sees nothing else of the recipe. What the one training loop asks of it:

    - `input`: "siamese" (every network gets the same batch) or "different" (each network a partner image);
      `paired`: batches of image pairs fixed for the run (images 2k and 2k + 1);
    - `active_network(step)`: the one network a step updates (iterative training), or None for all of them;
    - `set_epoch(epoch)`: called at the start of every epoch (staged methods, warm-ups);
    - `task_state()` / `load_task_state(state)`: what a checkpoint keeps besides the parameters (W2 caches);
    - `progress_parts`: loss parts shown next to each network's classification loss (`{i}/cls`, which every method
      logs) in the live progress, {part: label};
    - `forward(batch)` -> {"loss", "logits": one tensor per network, "parts": {"{i}/<part>": loss term}}.
    """

    name = "base"
    uses_mkb = False          # build the networks with MKB halves attached
    shared_transfer = True    # one space transfer per site shared by all networks (False: one per network)
    # Computes only the networks in `cohort.indices` (train.placement: per-network, one network per process), and
    # every trainable parameter gets a gradient in a simultaneous step (DDP need not look for unused ones).
    per_network = False
    needs_teacher = False     # network 0 is a frozen teacher whose weights training loads from `kd.teacher`
    # The method sections of the recipe (cl, kd, dml, fitnets, wel) it reads: `clcli compare` reuses a finished run
    # when only other methods' sections changed (e.g. a CL variant reuses the IL runs of its seed).
    recipe_sections: tuple[str, ...] = ()
    progress_parts: dict[str, str] = {}
    input = "siamese"
    # Each batch is made of pairs of images fixed for the run: positions 2k and 2k + 1 are partners (WEL's W2
    # pairs, solved once and cached); the batch per forward is then even.
    paired = False
    iterative = False         # update one network per step, in turn (cl.manner: iterative)

    def __init__(self, cohort):
        super().__init__()
        self.cohort = cohort

    def active_network(self, step: int) -> int | None:
        return step % len(self.cohort.networks) if self.iterative else None

    def set_epoch(self, epoch: int) -> None:
        pass

    def task_state(self) -> dict:
        return {}

    def load_task_state(self, state: dict) -> None:
        pass

    def placement_refusal(self) -> str | None:
        """Why the method cannot run with one network per process (train.placement per-network), or None."""
        if not self.per_network:
            return (f"method '{self.name}' cannot run with one network per process (train.placement per-network: il, "
                    f"cl, mkb-solo); use train.placement replicated")
        if self.iterative:
            return "cl.manner iterative updates one network at a time: use train.placement replicated"
        return None

    def forward(self, batch: Batch) -> dict:
        raise NotImplementedError


def get(name: str) -> type[Method]:
    """The method class registered as `name`; one-line error otherwise."""
    if name in NOT_TRAINED:
        raise ClcliError(NOT_TRAINED[name])
    if name not in METHODS:
        raise ClcliError(f"unknown method '{name}'; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def create(name: str, cohort, recipe) -> Method:
    """Method `name` on `cohort`, given the recipe sections it reads."""
    cls = get(name)
    return cls(cohort, **{section: getattr(recipe, section) for section in cls.recipe_sections})


def uses_mkb(name: str) -> bool:
    return get(name).uses_mkb
