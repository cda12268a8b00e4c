"""What a run does at the end of a step or an epoch, behind one small interface.

The loop (`clcli.train.fit`) knows steps and epochs only. Everything else a run does around them (evaluation, the
weights' moving average, the best epoch and early stop, the plateau schedule, metrics.jsonl and the trackers, the
live display, the checkpoint) is a `Callback`, each in a room of its own with its own state, called in order at the
same points, as Lightning's callbacks and timm's train.py order them. A new part touches neither `fit` nor the others.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Loop:
    """What the parts may read of the training in progress (and the few things they decide)."""

    # (the interface sits below the rooms that implement it, so these are not typed by import)
    method: object                      # the method, which owns the cohort
    data: object                        # clcli.data.Data
    recipe: object
    run_dir: Path
    dist: object                        # _dist.Dist: this process's place under torchrun
    feed: object                        # _feed.Feed: the batches
    optimisation: object                # _optim.Optimisation: optimiser, schedule, clipping, mixed precision
    start_epoch: int = 0                # the first epoch this process trains (after a checkpoint: its epoch)
    epoch: int = 0                      # the epoch in progress (0-based)
    step: int = -1                      # the step in progress within the epoch (0-based)
    epochs_done: int = 0                # epochs trained so far, this process's and the checkpoint's
    saved_epoch: int = 0                # the epoch of the checkpoint on disk (0: none yet)
    stop: str | None = None             # why training stops before train.epochs (a part decides), else None
    callbacks: list["Callback"] = field(default_factory=list)

    @property
    def cohort(self):
        return self.method.cohort

    @property
    def steps(self) -> int:
        """Steps per epoch."""
        return self.feed.steps

    @property
    def global_step(self) -> int:
        """Optimiser steps done since the start of the run, the one in progress included."""
        return self.epoch * self.feed.steps + self.step + 1


@dataclass
class Window:
    """A log step (every train.log_every steps and the last of an epoch): the epoch's mean loss parts and training
    accuracy so far, over the processes, and images/s since the last log step."""

    means: dict[str, float]             # "i/part" -> mean over the epoch's steps so far
    accuracy: list[float]               # per network, % of the epoch's training images so far (augmented)
    rate: float                         # images/s


@dataclass
class EpochEnd:
    """One epoch's end, filled by the parts in order: the record metrics.jsonl and the trackers get, the test and
    validation accuracy per network, the accuracy the plateau schedule watches."""

    epoch: int
    record: dict                        # {"type": "epoch", ...}: each part adds its keys
    test_acc: dict[str, float] = field(default_factory=dict)
    val_acc: dict[str, float] = field(default_factory=dict)  # on the validation split, where one is held out
    watched: float | None = None        # mean accuracy the plateau schedule steps on (validation where there is one)


class Callback:
    """One part of a run. Every method is optional; `key` names its state in the checkpoint."""

    key: str | None = None

    def on_fit_start(self, loop: Loop) -> None:
        """Before the first epoch this process trains (after the checkpoint's state is loaded)."""

    def on_step_start(self, loop: Loop) -> None:
        """Before each optimiser step."""

    def on_step_end(self, loop: Loop, window: Window | None) -> None:
        """After each optimiser step; `window` at a log step, else None (reading the means costs a host sync)."""

    def on_epoch_end(self, loop: Loop, end: EpochEnd) -> None:
        """At the end of each epoch, in the parts' order."""

    def on_fit_end(self, loop: Loop, summary: dict) -> None:
        """After the last epoch: add this part's final numbers to the run's summary."""

    def close(self) -> None:
        """Always, last, also when training stops on an error."""

    def state_dict(self):
        """What the checkpoint keeps of this part (under `key`)."""
        return None

    def load_state_dict(self, state) -> None:
        """A checkpoint's state of this part, when resuming."""
