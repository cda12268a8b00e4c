"""The one training loop: steps and epochs. What happens at their ends is the parts' (`_callbacks.Callback`)."""
from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch

from clcli import run as run_folder
from clcli import tracking
from clcli.data import Data
from clcli.errors import ClcliError

from . import _dist, _parts
from ._callbacks import Callback, EpochEnd, Loop, Window
from ._feed import Feed
from ._interrupt import as_interrupted
from ._optim import Optimisation
from ._step import train_step


def fit(method, data: Data, recipe, run_dir: Path, *, start_state: dict | None = None, show_progress: bool = True,
        console=None, trackers: tracking.Trackers | None = None, callbacks: list[Callback] = ()) -> dict:
    """Train `method` (which owns the cohort) on `data`, checkpointing after every epoch, with the standard parts of
    a run and `callbacks` of the caller's own (after the display, before the checkpoint). Returns the summary."""
    loop = _start(method, data, recipe, run_dir, console)
    loop.callbacks = _parts.standard(method, data, recipe, loop.dist, show_progress=show_progress, console=console,
                                     trackers=trackers or tracking.NONE, extra=list(callbacks))
    _restore(loop, start_state)
    cfg, feed, optimisation = recipe.train, loop.feed, loop.optimisation
    model = _dist.wrap(method, loop.dist, find_unused=method.iterative or not method.per_network)
    try:
        _call(loop, "on_fit_start")
        for loop.epoch in range(loop.start_epoch, cfg.epochs):
            if loop.stop is not None:  # a part ended the run (train.patience)
                break
            _seed(cfg.seed, loop.epoch)
            method.train()
            method.set_epoch(loop.epoch)
            tally = _EpochTally(len(loop.cohort.networks), feed.device)
            for loop.step, batch in enumerate(feed.epoch(loop.epoch)):
                _call(loop, "on_step_start")
                index = loop.epoch * feed.steps + loop.step  # of this update in the run, from 0
                batch.active = method.active_network(index)
                optimisation.before_step(index)
                train_step(model, batch, optimisation.optimizer, accumulate=cfg.accumulate,
                           autocast=optimisation.autocast, scaler=optimisation.scaler, shared=optimisation.shared,
                           dist=loop.dist, sums=tally.sums, correct=tally.correct, clip=optimisation.clip)
                tally.add(feed.batch_size)
                last = loop.step + 1 == feed.steps  # the last step always logs: its means are the epoch's
                window = tally.window(loop) if last or (loop.step + 1) % cfg.log_every == 0 else None
                _call(loop, "on_step_end", window)
            train_loss = sum(window.means[f"{i}/cls"] for i in range(len(loop.cohort.networks)))
            _call(loop, "on_epoch_end", EpochEnd(loop.epoch, {
                "type": "epoch", "epoch": loop.epoch, "step": (loop.epoch + 1) * feed.steps,
                "lr": optimisation.lr, "train_loss": round(train_loss, 5)}))
            loop.epochs_done = loop.epoch + 1
        summary = {"epochs": loop.epochs_done}
        _call(loop, "on_fit_end", summary)
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM or SIGHUP: say where; the caller adds how to continue
        stopped = as_interrupted(e)
        stopped.where = f"epoch {loop.epoch + 1} step {loop.step + 1} of {feed.steps}"
        raise stopped from None
    finally:
        for part in loop.callbacks:
            part.close()
    return summary


def _start(method, data: Data, recipe, run_dir: Path, console) -> Loop:
    """The feed and the optimisation, checked for this placement; the cohort told which networks are this
    process's (per-network placement)."""
    d = _dist.current()
    feed = Feed(data, recipe, method, d)  # under torchrun: this process's slice of each batch (DDP)
    optimisation = Optimisation(method, recipe, feed.steps, feed.device)
    _dist.check_placement(d, method, recipe, len(method.cohort.networks), feed.batch_size, optimisation.scaler)
    note = feed.small_batch_note()
    if note and console is not None and d.main:
        console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    method.cohort.local = d.rank if d.per_network else None
    return Loop(method, data, recipe, run_dir, d, feed, optimisation)


def _restore(loop: Loop, state: dict | None) -> None:
    """A checkpoint's state into the method, the optimisation and every part that keeps one."""
    loop.start_epoch = loop.epochs_done = loop.saved_epoch = loop.epoch = \
        loop.optimisation.restore(loop.method, state)
    if state is not None:
        for part in loop.callbacks:
            if part.key is not None and part.key in state:
                part.load_state_dict(state[part.key])


def _call(loop: Loop, hook: str, *args) -> None:
    for part in loop.callbacks:
        getattr(part, hook)(loop, *args)


def _seed(seed: int, epoch: int) -> None:
    """A resumed run repeats an epoch exactly: every generator a transform may draw from starts the epoch from
    (seed, epoch) (timm's random erasing draws from Python's and torch's)."""
    torch.manual_seed(seed * 100003 + epoch)
    random.seed(seed * 100003 + epoch)


class _EpochTally:
    """Loss parts and right answers summed over the epoch's steps (on the device, filled by `train_step`), images
    since the last log step."""

    def __init__(self, n_nets: int, device: torch.device):
        self.sums: dict[str, torch.Tensor] = {}
        self.correct = torch.zeros(n_nets, device=device)
        self.seen = 0
        self.window_start, self.window_images = time.perf_counter(), 0

    def add(self, images: int) -> None:
        self.seen += images
        self.window_images += images

    def window(self, loop: Loop) -> Window:
        """The epoch's means so far over the processes (one host sync) and images/s since the last log step; a
        non-finite loss stops the run here."""
        means = _dist.mean_parts(loop.dist, self.sums, loop.step + 1)
        if not all(math.isfinite(v) for v in means.values()):
            raise ClcliError(f"non-finite loss at epoch {loop.epoch + 1} step {loop.step + 1} ({means}); stopped: "
                             f"{run_folder.kept_checkpoint(loop.run_dir, loop.saved_epoch)}; try a lower train.lr")
        rate = self.window_images / max(time.perf_counter() - self.window_start, 1e-9)
        self.window_start, self.window_images = time.perf_counter(), 0
        accuracy = (100.0 * _dist.total(loop.dist, self.correct) / self.seen).tolist()
        return Window(means, accuracy, rate)
