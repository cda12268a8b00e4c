"""One training loop for every method: data in memory as uint8, augmented in batches on the training device."""
from __future__ import annotations

import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from clcli import mkb
from clcli import run as run_folder
from clcli.cohort import Cohort
from clcli.data import Data, streamed_skips, to_input
from clcli.errors import ClcliError
from clcli.evaluation import evaluate

from . import _dist
from ._dist import resolve_device


def param_groups(method: nn.Module, recipe) -> list[dict]:
    """One group per network (its own weights and MKB encoder/decoder) plus one for everything else the method
    trains (shared space transfers, verification heads, FitNets regressors, WEL heads), so that lr and weight decay
    can be set per network."""
    cfg = recipe.train
    cohort: Cohort = method.cohort
    seen: set[int] = set()
    groups = []
    unknown = sorted((set(cfg.network_lr) | set(cfg.network_weight_decay)) - set(cohort.labels))
    if unknown:
        raise ClcliError(f"train.network_lr / train.network_weight_decay name '{unknown[0]}', which is not a network "
                         f"of this cohort ({', '.join(cohort.labels)})")
    for net, name in zip(cohort.networks, cohort.labels):
        own = [p for n, p in net.named_parameters() if not mkb.is_shared(n)]
        seen.update(id(p) for p in own)
        groups.append({"params": own, "lr": cfg.network_lr.get(name, cfg.lr),
                       "weight_decay": cfg.network_weight_decay.get(name, cfg.weight_decay), "name": name})
    shared = [p for p in method.parameters() if id(p) not in seen]
    if shared:
        groups.append({"params": shared, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "shared"})
    return groups


def _scheduler(optimizer, recipe, steps_per_epoch: int):
    cfg = recipe.train
    total = max(cfg.epochs * steps_per_epoch, 1)
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=cfg.plateau_patience)
    if cfg.schedule == "cosine":
        fn = lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
    elif cfg.schedule == "step":
        fn = lambda step: 0.1 ** sum(step >= m * total for m in (0.5, 0.75))  # noqa: E731
    else:
        fn = lambda step: 1.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def _partners(n: int, n_nets: int, seed: int) -> list[torch.Tensor]:
    """A fixed random permutation of the dataset per extra network (different-input mode)."""
    return [torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + j)) for j in range(1, n_nets)]


def _fault_injection(step: int) -> None:
    """Tests kill the process mid-epoch to check that --resume is exact (CLCLI_FAULT_KILL_AT_STEP=global step)."""
    at = os.environ.get("CLCLI_FAULT_KILL_AT_STEP")
    if at is not None and step == int(at):
        os.kill(os.getpid(), signal.SIGKILL)


class _Progress:
    """Rich live progress: epoch, step, loss parts and accuracy per network, images/s, ETA."""

    def __init__(self, enabled: bool, total_steps: int, label: str, console=None):
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
            console=console, transient=False,
        )
        self.task = self.progress.add_task(label, total=total_steps, status="")
        self.progress.start()

    def update(self, completed: int, status: str) -> None:
        if self.enabled:
            self.progress.update(self.task, completed=completed, status=status)

    def log(self, text: str) -> None:
        if self.enabled:
            self.progress.console.print(text, highlight=False)

    def stop(self) -> None:
        if self.enabled:
            self.progress.stop()


def mixed_precision(device: torch.device, enabled: bool):
    """(autocast on?, its dtype, GradScaler or None): bf16 autocast on CUDA where the GPU has it, else fp16 with a
    gradient scaler; nothing on other devices."""
    amp = device.type == "cuda" and enabled
    dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
    return amp, dtype, torch.amp.GradScaler("cuda") if amp and dtype == torch.float16 else None


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


def fit(method, data: Data, recipe, run_dir: Path, *, start_state: dict | None = None, show_progress: bool = True,
        console=None) -> dict:
    """Train `method` (which owns the cohort) on `data`; checkpoint after every epoch. Returns the final summary."""
    from clcli.data import BatchAugment, epoch_batches
    from clcli.methods import Batch

    cfg = recipe.train
    cohort: Cohort = method.cohort
    device = data.train_images.device
    n_nets = len(cohort.networks)
    batch_size = min(cfg.batch_size, len(data.train_labels))
    steps_per_epoch = len(data.train_labels) // batch_size
    if steps_per_epoch == 0:
        raise ClcliError(f"the training split has {len(data.train_labels)} images, fewer than one batch")
    groups = param_groups(method, recipe)
    optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov and cfg.momentum > 0)
    scheduler = _scheduler(optimizer, recipe, steps_per_epoch)
    per_step_schedule = not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    start_epoch = 0
    if start_state is not None:
        method.load_state_dict(start_state["method"])
        optimizer.load_state_dict(start_state["optimizer"])
        scheduler.load_state_dict(start_state["scheduler"])
        start_epoch = int(start_state["epoch"])
        if getattr(method, "w2_cache", None) is not None and "w2_cache" in start_state:
            method.w2_cache.load_state_dict(start_state["w2_cache"])
    streamed = hasattr(data.train_images, "epoch_feed")  # decoded and augmented in DataLoader workers
    augment = None if streamed else BatchAugment(recipe.data.augment, recipe.data.padding)
    siamese = recipe.cl.input == "siamese" or not method.uses_mkb
    if streamed and not siamese:
        raise ClcliError("cl.input=different pairs images across the whole training set; it needs in-memory data "
                         "(data.stream=false)")
    topk = (1, 5) if len(data.class_names) > 5 else (1,)
    iterative = recipe.cl.manner == "iterative" and method.uses_mkb
    amp, amp_dtype, scaler = mixed_precision(device, cfg.amp)
    # Under torchrun: this process's slice of each batch (DDP), or its own network (per-network placement).
    d = _dist.current()
    _dist.check(d, method, recipe, n_nets, batch_size, scaler)
    cohort.local = d.rank if d.per_network else None
    model = _dist.wrap(method, d, find_unused=iterative or not method.per_network)
    shared = [p for g in groups if g["name"] == "shared" for p in g["params"]]
    accumulate = cfg.accumulate

    def scores() -> dict[str, dict[str, float]]:
        """Each network's test accuracy with its own MKB halves (as deployed), measured by rank 0."""
        return _dist.from_main(d, {name: evaluate(net, data.test_images, data.test_labels, data.mean, data.std,
                                                  topk=topk, channels_last=cfg.channels_last)
                                   for name, net in zip(cohort.labels, cohort.networks)} if d.main else None)

    log = run_folder.MetricsLog(run_dir / "metrics.jsonl", keep_before_epoch=start_epoch) if d.main else _NoLog()
    progress = _Progress(show_progress and d.main, (cfg.epochs - start_epoch) * steps_per_epoch,
                         f"{method.name} {'+'.join(cohort.labels)}", console)
    summary: dict = {}
    reported_skips = 0
    try:
        for epoch in range(start_epoch, cfg.epochs):
            # Everything random in an epoch derives from (seed, epoch): a resumed run repeats it exactly.
            torch.manual_seed(cfg.seed * 100003 + epoch)
            orders = [epoch_batches(len(data.train_labels), batch_size, seed=cfg.seed, epoch=epoch)]
            feed = data.train_images.epoch_feed([d.take(b) for b in orders[0][:steps_per_epoch]], seed=cfg.seed,
                                                epoch=epoch) if streamed else None
            if not siamese:
                # Different inputs: network j sees partner_j[i] whenever network 0 sees image i. The pairing is
                # fixed for the run, so each image pair's W2 is solved once (first epoch) and cached after that.
                orders += [[partner[b] for b in orders[0]] for partner in _partners(len(data.train_labels),
                                                                                     n_nets, cfg.seed)]
            gens = [torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + epoch * 131 + j)
                    for j in range(len(orders))]
            # The epoch's indices go to the device once (no copy per step); the CPU copy keys the W2 cache.
            dev_orders = [_to_device(torch.stack(order[:steps_per_epoch]), device) for order in orders]
            method.train()
            if hasattr(method, "set_epoch"):  # staged methods (FitNets) follow the epoch
                method.set_epoch(epoch)
            sums: dict[str, torch.Tensor] = {}
            correct = torch.zeros(n_nets, device=device)
            seen = 0
            window_start, window_images = time.perf_counter(), 0
            for step in range(steps_per_epoch):
                global_step = epoch * steps_per_epoch + step
                _fault_injection(global_step)
                idx = [d.take(order[step]) for order in orders]  # this process's slice of the global batch
                dev_idx = [d.take(order[step]) for order in dev_orders]
                if streamed:
                    images, positions = next(feed)
                    if positions is not None:  # unreadable images: their slots hold copies of readable ones
                        idx[0], dev_idx[0] = idx[0][positions], dev_idx[0][positions.to(dev_idx[0].device)]
                    raw = [images]
                else:
                    raw = [augment(data.train_images[i], g, d.part) for i, g in zip(dev_idx, gens)]
                inputs = [to_input(r, data.mean, data.std, cfg.channels_last) for r in raw]
                targets = [data.train_labels[i] for i in dev_idx]
                if siamese:
                    idx, raw, inputs, targets = idx * n_nets, raw * n_nets, inputs * n_nets, targets * n_nets
                batch = Batch(inputs, targets, idx, raw, active=(global_step % n_nets) if iterative else None)
                optimizer.zero_grad(set_to_none=True)
                for m, micro in enumerate(_micro_batches(batch, accumulate)):
                    # DDP all-reduces the gradients once, after the last micro-batch's backward.
                    with nullcontext() if model is method or m + 1 == accumulate else model.no_sync():
                        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                            out = model(micro)
                        loss = out["loss"] / accumulate if accumulate > 1 else out["loss"]
                        (scaler.scale(loss) if scaler is not None else loss).backward()
                    with torch.no_grad():  # loss parts stay on the device until the log step: no sync here
                        for k, v in out["parts"].items():
                            v = v.detach().float() / accumulate if accumulate > 1 else v.detach().float()
                            sums[k] = sums[k] + v if k in sums else v
                        for i, logits in enumerate(out["logits"]):
                            if logits is not None:  # None: another process's network (per-network placement)
                                correct[i] += (logits.argmax(1) == micro.targets[i]).sum()
                _dist.sum_shared_grads(shared, d)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                if per_step_schedule:
                    scheduler.step()
                seen += batch_size
                window_images += batch_size
                if (step + 1) % cfg.log_every == 0 or step + 1 == steps_per_epoch:
                    means = _dist.mean_parts(d, sums, step + 1)  # one host sync per log window
                    if not all(math.isfinite(v) for v in means.values()):
                        raise ClcliError(
                            f"non-finite loss at epoch {epoch + 1} step {step + 1} ({means}); stopped, the last "
                            f"good checkpoint is kept in {run_dir}")
                    rate = window_images / max(time.perf_counter() - window_start, 1e-9)
                    window_start, window_images = time.perf_counter(), 0
                    accs = (100.0 * _dist.total(d, correct) / seen).tolist()
                    lr = optimizer.param_groups[0]["lr"]
                    log.write({"type": "step", "epoch": epoch, "step": global_step + 1, "lr": lr,
                               "images_per_s": round(rate, 1), **{k: round(v, 5) for k, v in means.items()},
                               **{f"{i}/train_acc": round(a, 3) for i, a in enumerate(accs)}})
                    status = "  ".join(
                        f"{cohort.labels[i]}: loss {means[f'{i}/cls']:.3f} acc {accs[i]:.1f}"
                        + (f" metric {means[f'{i}/metric']:.3f} ver {means[f'{i}/verification']:.3f}"
                           if f"{i}/metric" in means else "")
                        for i in range(n_nets))
                    progress.update((epoch - start_epoch) * steps_per_epoch + step + 1,
                                    f"epoch {epoch + 1}/{cfg.epochs}  {rate:.0f} img/s  {status}")
            train_loss = sum(means[f"{i}/cls"] for i in range(n_nets))  # the last log step's means: the epoch's
            if not per_step_schedule:
                scheduler.step(train_loss)
            _dist.sync_networks(method, optimizer, d)  # per-network placement: every process gets every network
            epoch_scores = scores()
            accs = {name: s["top1"] for name, s in epoch_scores.items()}
            top5 = {name: s["top5"] for name, s in epoch_scores.items() if "top5" in s}  # more than 5 classes
            record = {"type": "epoch", "epoch": epoch, "step": (epoch + 1) * steps_per_epoch,
                      "lr": optimizer.param_groups[0]["lr"], "train_loss": round(train_loss, 5),
                      "test_acc": {k: round(v, 3) for k, v in accs.items()}}
            if top5:
                record["test_top5"] = {k: round(v, 3) for k, v in top5.items()}
            log.write(record)
            progress.log(f"epoch {epoch + 1}/{cfg.epochs}  " + "  ".join(f"{k} {v:.2f}%" for k, v in accs.items()))
            skips = streamed_skips(data)
            if len(skips) > reported_skips:
                progress.log(f"skipped {len(skips) - reported_skips} unreadable streamed image(s) (first: "
                             f"{skips[reported_skips]['image']}: {skips[reported_skips]['reason']})")
                reported_skips = len(skips)
            state = {"version": run_folder.RUN_FORMAT, "epoch": epoch + 1, "method": method.state_dict(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            if getattr(method, "w2_cache", None) is not None:
                state["w2_cache"] = method.w2_cache.state_dict()
            if d.main:
                run_folder.save_checkpoint(run_dir / run_folder.CHECKPOINT, state)
            summary = {"epochs": epoch + 1, "test_acc": accs, **({"test_top5": top5} if top5 else {})}
        if not summary:  # resumed after the last epoch's checkpoint: nothing left to train
            summary = {"epochs": cfg.epochs, "test_acc": {name: s["top1"] for name, s in scores().items()}}
    finally:
        progress.stop()
        log.close()
    return summary
