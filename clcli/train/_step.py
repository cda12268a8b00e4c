"""One optimiser step of training (and of `clcli bench`): forward and backward over micro-batches, the shared
gradients summed under torchrun, clipping, the optimiser step."""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from . import _dist
from ._targets import hard_labels


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
