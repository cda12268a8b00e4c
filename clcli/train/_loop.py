"""One training loop for every method: data in memory as uint8, augmented in batches on the training device."""
from __future__ import annotations

import math
import os
import random
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from clcli import models, tracking
from clcli import run as run_folder
from clcli.data import Data, streamed_skips, to_input
from clcli.errors import ClcliError
from clcli.evaluation import evaluate, per_class_accuracy

from . import _dist
from ._ema import CohortEma
from ._interrupt import as_interrupted
from ._optim import Optimisation, mixed_precision, param_groups, speed_settings  # noqa: F401 (re-exported)
from ._targets import TargetMixer, hard_labels


def _partners(n: int, n_nets: int, seed: int) -> list[torch.Tensor]:
    """A fixed random permutation of the dataset per extra network (different-input mode)."""
    return [torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + j)) for j in range(1, n_nets)]


def _pairs(n: int, seed: int) -> torch.Tensor:
    """The n images in fixed pairs for the run, [ceil(n / 2), 2] (paired methods: WEL); with n odd the last one
    pairs with the first of the permutation."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + 104729))
    return (torch.cat([order, order[:1]]) if n % 2 else order).view(-1, 2)


def _fault_injection(step: int) -> None:
    """Tests stop the process mid-epoch to check that --resume is exact and that interruptions are reported
    (CLCLI_FAULT_KILL_AT_STEP=global step; CLCLI_FAULT_SIGNAL=INT, TERM or HUP sends that signal instead of KILL)."""
    at = os.environ.get("CLCLI_FAULT_KILL_AT_STEP")
    if at is not None and step == int(at):
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("CLCLI_FAULT_SIGNAL", "KILL")))


class _Progress:
    """Rich live progress: a bar with the epoch, step, images/s and ETA, and under it one line per network with its
    loss parts and training accuracy (one line per network never runs past a terminal's width)."""

    def __init__(self, enabled: bool, total_steps: int, label: str, console=None):
        self.enabled = enabled
        if not enabled:
            return
        from rich.console import Group
        from rich.live import Live
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=console)
        self.task = self.progress.add_task(label, total=total_steps, status="")
        self.networks: list[tuple[str, dict[str, float], float]] = []
        self.live = Live(Group(self.progress, self), console=console, refresh_per_second=4)
        self.live.start()

    def __rich__(self):
        from rich.table import Table

        grid = Table.grid(padding=(0, 2))
        for label, parts, acc in self.networks:
            grid.add_row(f"  {label}", f"acc {acc:5.1f}%", *(f"{part} {value:.3f}" for part, value in parts.items()))
        return grid

    def update(self, completed: int, status: str, networks: list[tuple[str, dict[str, float], float]]) -> None:
        """`networks`: (label, {loss part: mean}, training accuracy %) per network."""
        if self.enabled:
            self.networks = networks
            self.progress.update(self.task, completed=completed, status=status)

    def advance(self, completed: int) -> None:
        """The step count, and with it the ETA, after every step; the loss parts wait for `update` at a log window
        (reading them needs a host sync, counting steps does not)."""
        if self.enabled:
            self.progress.update(self.task, completed=completed)

    def log(self, text: str) -> None:
        if self.enabled:
            self.live.console.print(text, highlight=False)

    def stop(self) -> None:
        if self.enabled:
            self.live.stop()


def images_per_second(rate: float) -> str:
    """A rate with three significant figures at most and never "0": 1,234 / 87.5 / 0.412."""
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.1f}" if rate >= 10 else f"{rate:.3g}"


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to CUDA from pinned memory, without blocking the host."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _micro_batches(batch, n: int) -> list:
    """`batch` cut into n equal micro-batches along the batch dimension (train.accumulate)."""
    if n == 1:
        return [batch]
    from dataclasses import replace

    def cut(xs):
        return [x.chunk(n) for x in xs]

    images, targets, indices, raw = (cut(xs) for xs in (batch.images, batch.targets, batch.indices, batch.raw))
    return [replace(batch, images=[x[m] for x in images], targets=[x[m] for x in targets],
                    indices=[x[m] for x in indices], raw=[x[m] for x in raw]) for m in range(n)]


class _NoLog:
    """metrics.jsonl on processes other than rank 0: nothing is written."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def train_step(model: nn.Module, batch, optimizer: torch.optim.Optimizer, *, accumulate: int = 1,
               autocast: tuple[bool, torch.dtype] = (False, torch.float16), scaler=None, shared=(), dist=None,
               sums: dict | None = None, correct: torch.Tensor | None = None, clip=None) -> dict:
    """One optimiser step of `clcli train` (and `clcli bench`) on `batch`: forward and backward over `accumulate`
    equal micro-batches (under DDP the gradients are all-reduced once, after the last), the `shared` parameters'
    gradients summed over the processes (per-network placement), then the optimiser step (through the fp16 gradient
    scaler when there is one), after `clip()` (gradient clipping) when given. `model` is the method, or DDP around
    it; `autocast` is (on?, dtype) from `mixed_precision`. Targets are class indices or soft targets [B, C] (label
    smoothing, mixup), whose argmax training accuracy counts. The loss parts (detached, on the device: no host
    sync) are added into `sums` and the right top-1 answers per network into `correct`, when given. Returns the
    last micro-batch's output."""
    amp, amp_dtype = autocast
    device_type = batch.images[0].device.type
    optimizer.zero_grad(set_to_none=True)
    for m, micro in enumerate(_micro_batches(batch, accumulate)):
        last = m + 1 == accumulate
        with nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            with torch.autocast(device_type, dtype=amp_dtype, enabled=amp):
                out = model(micro)
            loss = out["loss"] / accumulate if accumulate > 1 else out["loss"]
            (scaler.scale(loss) if scaler is not None else loss).backward()
        with torch.no_grad():  # loss parts stay on the device until the log step: no sync here
            if sums is not None:
                for k, v in out["parts"].items():
                    v = v.detach().float() / accumulate if accumulate > 1 else v.detach().float()
                    sums[k] = sums[k] + v if k in sums else v
            if correct is not None:
                for i, logits in enumerate(out["logits"]):
                    if logits is not None:  # None: another process's network (per-network placement)
                        correct[i] += (logits.argmax(1) == hard_labels(micro.targets[i])).sum()
    if dist is not None:
        _dist.sum_shared_grads(shared, dist)
    if clip is not None:
        clip()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return out


def _has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


class _Feed:
    """The training batches, epoch by epoch, as the method asks for them (`method.input`): a seeded order per epoch,
    this process's slice of each batch, augmentation on the device (or decoded and augmented in DataLoader workers
    when streamed), normalisation; the same batch for every network (siamese) or a fixed partner image per network
    (different inputs); for a paired method, batches of fixed pairs of images."""

    def __init__(self, data: Data, recipe, method, d: _dist.Dist):
        from clcli.data import BatchAugment, batch_erasing

        self.data, self.d, self.cfg = data, d, recipe.train
        self.n_nets = len(method.cohort.networks)
        self.batch_size = min(self.cfg.batch_size, len(data.train_labels))
        self.steps = len(data.train_labels) // self.batch_size
        if self.steps == 0:
            raise ClcliError(f"the training split has {len(data.train_labels)} images, fewer than one batch")
        # What one BatchNorm layer normalises in a training forward: a process's slice of the batch, cut into
        # micro-batches. One image has no batch statistics (torch stops with a 100-line traceback).
        self.per_forward = self.batch_size // (d.part[1] * self.cfg.accumulate)
        self.batch_norm = _has_batch_norm(method)
        if self.per_forward < 2 and self.batch_norm:
            raise ClcliError(f"train.batch_size {self.cfg.batch_size} gives BatchNorm one image per forward "
                             f"({d.part[1]} process(es) x train.accumulate {self.cfg.accumulate}), from which it "
                             "cannot compute statistics: use at least 2 images per process and micro-batch, and "
                             "below 8 also train.clip_grad (e.g. 1.0; docs/results.md)")
        self.pairs = _pairs(len(data.train_labels), self.cfg.seed) if method.paired else None
        if self.pairs is not None:
            if self.per_forward % 2:
                raise ClcliError(f"method '{method.name}' trains on pairs of images that stay in one forward: "
                                 f"train.batch_size {self.cfg.batch_size} must give an even number of images per "
                                 f"forward ({d.part[1]} process(es) x train.accumulate {self.cfg.accumulate})")
            self.steps = len(self.pairs) // (self.batch_size // 2)

        self.device = data.train_images.device
        self.streamed = hasattr(data.train_images, "epoch_feed")  # decoded and augmented in DataLoader workers
        self.augment = None if self.streamed else BatchAugment(
            recipe.data.augment, recipe.data.padding, auto_augment=recipe.data.auto_augment, fill=data.mean)
        self.siamese = method.input == "siamese"
        self.erase = batch_erasing(recipe.data, self.device)  # timm's RandomErasing on the normalised batch, or None
        self.mixer = TargetMixer(self.cfg, len(data.class_names))
        if self.mixer.mixup is not None and not self.siamese:  # recipes.load refuses it first; a plan may not
            raise ClcliError("train.mixup/cutmix needs one batch shared by the cohort (siamese input)")
        if self.streamed and not self.siamese:
            raise ClcliError("cl.input=different pairs images across the whole training set; it needs in-memory "
                             "data (data.stream=false)")

    def small_batch_note(self) -> str | None:
        """A few images per forward without clipping: a BatchNorm layer on a small feature map (1x1 at the end of
        a network at 32 px) then normalises a few values per channel, and its gradient can blow weights up (measured:
        mobilenetv3_small_050's stem, IL as CL, docs/results.md)."""
        if self.per_forward >= 8 or self.cfg.clip_grad is not None or not self.batch_norm:
            return None
        return (f"{self.per_forward} images per forward: BatchNorm on a network's small feature maps sees as few "
                "values per channel and can blow weights up in a step (IL as CL); train.clip_grad (e.g. 1.0) keeps "
                "such small batches training")

    def epoch(self, epoch: int):
        """The epoch's batches (an iterator of `Batch`); everything random derives from (seed, epoch)."""
        from clcli.data import epoch_batches

        data, d, cfg, device = self.data, self.d, self.cfg, self.device
        if self.pairs is not None:
            # Images 2k and 2k+1 of every batch are partners for the whole run, so each pair's W2 is solved once
            # (first epoch) and cached after that; an epoch shuffles the pairs.
            orders = [[self.pairs[b].flatten() for b in epoch_batches(len(self.pairs), self.batch_size // 2,
                                                                      seed=cfg.seed, epoch=epoch)]]
        else:
            orders = [epoch_batches(len(data.train_labels), self.batch_size, seed=cfg.seed, epoch=epoch)]
        feed = data.train_images.epoch_feed([d.take(b) for b in orders[0][:self.steps]], seed=cfg.seed,
                                            epoch=epoch) if self.streamed else None
        if not self.siamese:
            # Different inputs: network j sees partner_j[i] whenever network 0 sees image i. The pairing is fixed
            # for the run, so each image pair's W2 is solved once (first epoch) and cached after that.
            orders += [[partner[b] for b in orders[0]] for partner in _partners(len(data.train_labels), self.n_nets,
                                                                                 cfg.seed)]
        # CPU generators whatever the device: one seed gives the same crops, flips and auto-augment draws on a GPU
        # as on the CPU (a CUDA generator draws other numbers); the few numbers a batch draws then move in one copy.
        gens = [torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 131 + j) for j in range(len(orders))]
        # The epoch's indices go to the device once (no copy per step); the CPU copy keys the W2 cache.
        dev_orders = [_to_device(torch.stack(order[:self.steps]), device) for order in orders]
        return (self._batch(epoch, step, orders, dev_orders, gens, feed) for step in range(self.steps))

    def _batch(self, epoch: int, step: int, orders, dev_orders, gens, feed):
        from clcli.methods import Batch

        data, d = self.data, self.d
        idx = [d.take(order[step]) for order in orders]  # this process's slice of the global batch
        dev_idx = [d.take(order[step]) for order in dev_orders]
        if feed is not None:
            images, positions = next(feed)
            if positions is not None:  # unreadable images: their slots hold copies of readable ones
                idx[0], dev_idx[0] = idx[0][positions], dev_idx[0][positions.to(dev_idx[0].device)]
            raw = [images]
        else:
            raw = [self.augment(data.train_images[i], g, d.part) for i, g in zip(dev_idx, gens)]
        inputs = [to_input(r, data.mean, data.std, self.cfg.channels_last) for r in raw]
        targets = [data.train_labels[i] for i in dev_idx]
        if self.erase is not None:  # where timm erases: after normalisation, before mixing
            inputs = [self.erase(x) for x in inputs]
        if self.mixer.active:  # soft targets; one mix for the cohort (siamese: one batch)
            mixed = [self.mixer(x, t, epoch=epoch, step=step) for x, t in zip(inputs, targets)]
            inputs, targets = [x for x, _ in mixed], [t for _, t in mixed]
        if self.siamese:
            n = self.n_nets
            idx, raw, inputs, targets = idx * n, raw * n, inputs * n, targets * n
        return Batch(inputs, targets, idx, raw)


class _EpochTally:
    """Loss parts and right answers summed over the epoch's steps (on the device), images/s per log window."""

    def __init__(self, n_nets: int, device: torch.device):
        self.sums: dict[str, torch.Tensor] = {}
        self.correct = torch.zeros(n_nets, device=device)
        self.seen = 0
        self.window_start, self.window_images = time.perf_counter(), 0
        self.means: dict[str, float] = {}

    def add(self, images: int) -> None:
        self.seen += images
        self.window_images += images

    def rate(self) -> float:
        """Images/s since the last call (or the start of the epoch)."""
        rate = self.window_images / max(time.perf_counter() - self.window_start, 1e-9)
        self.window_start, self.window_images = time.perf_counter(), 0
        return rate


class _Report:
    """Everything a run writes and shows: metrics.jsonl (rank 0) and the same records to the trackers, the live
    progress, each epoch's evaluation of every network as deployed, and the checkpoint."""

    def __init__(self, method, data: Data, recipe, run_dir: Path, d: _dist.Dist, start_epoch: int,
                 steps_per_epoch: int, show_progress: bool, console, trackers: tracking.Trackers,
                 autocast=(False, torch.float16)):
        self.method, self.cohort, self.data, self.d, self.run_dir = method, method.cohort, data, d, run_dir
        self.autocast = autocast  # evaluation under training's mixed precision
        self.cfg, self.steps = recipe.train, steps_per_epoch
        self.start_epoch = start_epoch
        self.topk = (1, 5) if len(data.class_names) > 5 else (1,)
        self.log = run_folder.MetricsLog(run_dir / "metrics.jsonl", keep_before_epoch=start_epoch) if d.main \
            else _NoLog()
        self.trackers = trackers  # train.log: TensorBoard, W&B, MLflow (rank 0's; nothing elsewhere)
        self.progress = _Progress(show_progress and d.main, (self.cfg.epochs - start_epoch) * steps_per_epoch,
                                  f"{method.name} {'+'.join(self.cohort.labels)}", console)
        self.reported_skips = 0
        self.saved_epoch = start_epoch  # the epoch of the checkpoint on disk (0: none yet)

    def _record(self, record: dict) -> None:
        self.log.write(record)
        self.trackers.log(record)

    def scores(self, networks=None, images=None, labels=None, confusion: bool = False) -> dict[str, dict]:
        """Each network's accuracy with its own MKB halves (as deployed), measured by rank 0: the live networks (or
        `networks`: the EMA ones) on the test split (or `images`, `labels`: the validation split); with `confusion`,
        each network's confusion matrix too."""
        data, d = self.data, self.d
        networks = self.cohort.networks if networks is None else networks
        images, labels = (data.test_images, data.test_labels) if images is None else (images, labels)
        classes = len(data.class_names) if confusion else None
        return _dist.from_main(d, {name: evaluate(net, images, labels, data.mean, data.std, topk=self.topk,
                                                  channels_last=self.cfg.channels_last, num_classes=classes,
                                                  autocast=self.autocast)
                                   for name, net in zip(self.cohort.labels, networks)} if d.main else None)

    def per_class(self, epoch_scores: dict[str, dict]) -> dict[str, dict]:
        """{network: {accuracy: per class %, confusion: rows true class, columns predicted}} (run.json)."""
        return {name: {"accuracy": per_class_accuracy(s["confusion"]), "confusion": s["confusion"]}
                for name, s in epoch_scores.items()}

    def window(self, tally: _EpochTally, epoch: int, step: int, lr: float) -> None:
        """A log step: the epoch's mean loss parts and training accuracy so far (one host sync), images/s."""
        d, labels = self.d, self.cohort.labels
        means = tally.means = _dist.mean_parts(d, tally.sums, step + 1)
        if not all(math.isfinite(v) for v in means.values()):
            raise ClcliError(f"non-finite loss at epoch {epoch + 1} step {step + 1} ({means}); stopped: "
                             f"{run_folder.kept_checkpoint(self.run_dir, self.saved_epoch)}; try a lower train.lr")
        rate = tally.rate()
        accs = (100.0 * _dist.total(d, tally.correct) / tally.seen).tolist()
        global_step = epoch * self.steps + step
        self._record({"type": "step", "epoch": epoch, "step": global_step + 1, "lr": lr,
                      "images_per_s": round(rate, 1), **{k: round(v, 5) for k, v in means.items()},
                      **{f"{i}/train_acc": round(a, 3) for i, a in enumerate(accs)}})
        shown = {"cls": "loss", **self.method.progress_parts}
        networks = [(labels[i], {label: means[f"{i}/{part}"] for part, label in shown.items() if f"{i}/{part}" in means},
                     accs[i]) for i in range(len(labels))]
        self.progress.update((epoch - self.start_epoch) * self.steps + step + 1,
                             f"epoch {epoch + 1}/{self.cfg.epochs}  {images_per_second(rate)} img/s", networks)

    def epoch(self, epoch: int, tally: _EpochTally, optimisation: Optimisation, ema: CohortEma | None,
              best: "_Best | None") -> dict:
        """The end of an epoch: the networks gathered (per-network placement), evaluation (live, EMA, validation),
        the plateau schedule, the best epochs, the epoch's record and the checkpoint. Returns the summary so far."""
        method, d, data = self.method, self.d, self.data
        train_loss = sum(tally.means[f"{i}/cls"] for i in range(len(self.cohort.networks)))  # the epoch's mean
        # per-network placement: every process, every network (and its EMA and optimiser state)
        _dist.sync_networks(method, optimisation.optimizer, d, ema.networks if ema is not None else ())
        epoch_scores = self.scores(confusion=True)  # the confusion matrix: a bincount on the device, no extra pass
        accs = {name: s["top1"] for name, s in epoch_scores.items()}
        top5 = {name: s["top5"] for name, s in epoch_scores.items() if "top5" in s}  # more than 5 classes
        record = {"type": "epoch", "epoch": epoch, "step": (epoch + 1) * self.steps, "lr": optimisation.lr,
                  "train_loss": round(train_loss, 5), "test_acc": {k: round(v, 3) for k, v in accs.items()}}
        if top5:
            record["test_top5"] = {k: round(v, 3) for k, v in top5.items()}
        summary = {"epochs": epoch + 1, "test_acc": accs, **({"test_top5": top5} if top5 else {}),
                   "per_class": self.per_class(epoch_scores)}
        if ema is not None:
            ema_accs = {name: s["top1"] for name, s in self.scores(ema.networks).items()}
            record["ema_test_acc"] = {k: round(v, 3) for k, v in ema_accs.items()}
            summary["ema_test_acc"] = ema_accs
        watched = accs  # what the plateau schedule watches: validation accuracy where there is a validation split
        if best is not None:
            val = {name: s["top1"] for name, s in self.scores(None, data.val_images, data.val_labels).items()}
            record["val_acc"] = {k: round(v, 3) for k, v in val.items()}
            best.update(epoch, val, accs, self.cohort.networks)
            record["best_epoch"] = {name: e + 1 for name, e in best.epoch.items()}
            summary["best"] = best.summary()
            watched = val
        optimisation.end_epoch(epoch, sum(watched.values()) / len(watched))
        self._record(record)
        self.progress.log(f"epoch {epoch + 1}/{self.cfg.epochs}  "
                          + "  ".join(f"{k} {v:.2f}%" for k, v in accs.items())
                          + ("  (EMA " + "  ".join(f"{v:.2f}%" for v in summary["ema_test_acc"].values()) + ")"
                             if ema is not None else ""))
        skips = streamed_skips(self.data)
        if len(skips) > self.reported_skips:
            first = skips[self.reported_skips]
            self.progress.log(f"skipped {len(skips) - self.reported_skips} unreadable streamed image(s) (first: "
                              f"{first['image']}: {first['reason']})")
            self.reported_skips = len(skips)
        state = optimisation.state(method, epoch + 1)
        if ema is not None:
            state["ema"] = ema.state_dict()
        if best is not None:
            state["best"] = best.state_dict()
        self._check_finite(state["method"], epoch)
        if d.main:
            try:
                run_folder.save_checkpoint(self.run_dir / run_folder.CHECKPOINT, state)
            except ClcliError as e:  # a full disk: say what is kept
                raise ClcliError(f"{e}; stopped after epoch {epoch + 1}: "
                                 f"{run_folder.kept_checkpoint(self.run_dir, self.saved_epoch)}") from None
        self.saved_epoch = epoch + 1
        return summary

    def _check_finite(self, state: dict, epoch: int) -> None:
        """Stop before a checkpoint with NaN or inf in a weight or buffer is written (a BatchNorm running_var that
        overflowed while the loss stayed finite): the previous checkpoint stays. Rank 0 decides for every process."""
        count, names = _dist.from_main(self.d, models.non_finite(state) if self.d.main else None)
        if count:
            raise ClcliError(f"after epoch {epoch + 1}, the weights and buffers have "
                             f"{models.describe_non_finite(count, names)}; stopped without saving them: "
                             f"{run_folder.kept_checkpoint(self.run_dir, self.saved_epoch)}; try a lower train.lr")

    def close(self) -> None:
        self.progress.stop()
        self.log.close()


class _Best:
    """train.keep_best: per network, the epoch of its best validation accuracy, that epoch's test accuracy and
    weights (its MKB halves included); train.patience: whether every network has gone that many epochs without a
    better one."""

    def __init__(self, labels: list[str], patience: int | None):
        self.labels, self.patience = labels, patience
        self.epoch: dict[str, int] = {}
        self.val_acc: dict[str, float] = {}
        self.test_acc: dict[str, float] = {}
        self.weights: dict[str, dict] = {}

    def update(self, epoch: int, val: dict[str, float], test: dict[str, float], networks) -> None:
        for name, net in zip(self.labels, networks):
            if name not in self.val_acc or val[name] > self.val_acc[name]:
                self.epoch[name], self.val_acc[name], self.test_acc[name] = epoch, val[name], test[name]
                self.weights[name] = {k: v.detach().clone() for k, v in net.state_dict().items()}

    def exhausted(self, epoch: int) -> bool:
        return (self.patience is not None and len(self.epoch) == len(self.labels)
                and all(epoch - self.epoch[name] >= self.patience for name in self.labels))

    def summary(self) -> dict[str, dict]:
        return {name: {"epoch": self.epoch[name] + 1, "val_acc": self.val_acc[name],
                       "test_acc": self.test_acc[name]} for name in self.labels}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "val_acc": self.val_acc, "test_acc": self.test_acc, "networks": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.val_acc, self.test_acc = dict(state["epoch"]), dict(state["val_acc"]), dict(state["test_acc"])
        self.weights = dict(state["networks"])


def fit(method, data: Data, recipe, run_dir: Path, *, start_state: dict | None = None, show_progress: bool = True,
        console=None, trackers: tracking.Trackers | None = None) -> dict:
    """Train `method` (which owns the cohort) on `data`; checkpoint after every epoch; every record also goes to
    `trackers` (train.log). Returns the final summary."""
    cfg, cohort, d = recipe.train, method.cohort, _dist.current()
    # Under torchrun: this process's slice of each batch (DDP), or its own network (per-network placement).
    feed = _Feed(data, recipe, method, d)
    optimisation = Optimisation(method, recipe, feed.steps, feed.device)
    ema = CohortEma(cohort.networks, cfg) if cfg.ema_decay > 0 else None  # before the checkpoint's weights load
    best = _Best(cohort.labels, cfg.patience) if cfg.keep_best else None
    if best is not None and getattr(data, "val_images", None) is None:
        raise ClcliError("train.keep_best needs a validation split held out of the training images (in-memory data)")
    start_epoch = optimisation.restore(method, start_state)
    if start_state is not None:
        if ema is not None:
            ema.load_state_dict(start_state["ema"])
        if best is not None and "best" in start_state:
            best.load_state_dict(start_state["best"])
    _dist.check(d, method, recipe, len(cohort.networks), feed.batch_size, optimisation.scaler)
    note = feed.small_batch_note()
    if note and console is not None and d.main:
        console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    cohort.local = d.rank if d.per_network else None
    model = _dist.wrap(method, d, find_unused=method.iterative or not method.per_network)
    report = _Report(method, data, recipe, run_dir, d, start_epoch, feed.steps, show_progress, console,
                     trackers if trackers is not None else tracking.NONE, optimisation.autocast)
    clip = optimisation.clip if cfg.clip_grad is not None else None
    summary: dict = {}
    epoch, step = start_epoch, -1  # where an interruption stopped
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if best is not None and best.exhausted(epoch - 1):
                summary["stopped_early"] = epoch  # a resumed run that had stopped: nothing more to train
                break
            # A resumed run repeats an epoch exactly: every generator a transform may draw from starts the epoch
            # from (seed, epoch) (timm's random erasing draws from Python's and torch's).
            torch.manual_seed(cfg.seed * 100003 + epoch)
            random.seed(cfg.seed * 100003 + epoch)
            batches = feed.epoch(epoch)
            method.train()
            method.set_epoch(epoch)
            tally = _EpochTally(len(cohort.networks), feed.device)
            for step, batch in enumerate(batches):
                global_step = epoch * feed.steps + step
                _fault_injection(global_step)
                batch.active = method.active_network(global_step)
                optimisation.before_step(global_step)
                train_step(model, batch, optimisation.optimizer, accumulate=cfg.accumulate,
                           autocast=optimisation.autocast, scaler=optimisation.scaler, shared=optimisation.shared,
                           dist=d, sums=tally.sums, correct=tally.correct, clip=clip)
                if ema is not None:
                    ema.update(cohort.networks, cohort.indices, global_step + 1)
                tally.add(feed.batch_size)
                if (step + 1) % cfg.log_every == 0 or step + 1 == feed.steps:
                    report.window(tally, epoch, step, optimisation.lr)
                else:
                    report.progress.advance((epoch - start_epoch) * feed.steps + step + 1)
            summary = report.epoch(epoch, tally, optimisation, ema, best)
            if best is not None and best.exhausted(epoch):
                summary["stopped_early"] = epoch + 1
                report.progress.log(f"no network has improved on the validation split for {cfg.patience} epochs: "
                                    f"stopped after epoch {epoch + 1} (train.patience)")
                break
        if "test_acc" not in summary:  # resumed after the last epoch's checkpoint: nothing left to train
            final = report.scores(confusion=True)
            summary.update(epochs=start_epoch, test_acc={name: s["top1"] for name, s in final.items()},
                           per_class=report.per_class(final))
            if ema is not None:
                summary["ema_test_acc"] = {name: s["top1"] for name, s in report.scores(ema.networks).items()}
            if best is not None:
                summary["best"] = best.summary()
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM or SIGHUP: say where; the caller adds how to continue
        stopped = as_interrupted(e)
        stopped.where = f"epoch {epoch + 1} step {step + 1} of {feed.steps}"
        raise stopped from None
    finally:
        report.close()
    return summary
