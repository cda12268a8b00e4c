"""The training batches, epoch by epoch: a seeded order, this process's slice, augmentation on the device."""
from __future__ import annotations

import torch
from torch import nn

from clcli.data import Data, to_input
from clcli.errors import ClcliError

from . import _dist
from ._targets import TargetMixer


def _partners(n: int, n_nets: int, seed: int) -> list[torch.Tensor]:
    """A fixed random permutation of the dataset per extra network (different-input mode)."""
    return [torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + j)) for j in range(1, n_nets)]


def _pairs(n: int, seed: int) -> torch.Tensor:
    """The n images in fixed pairs for the run, [ceil(n / 2), 2] (paired methods: WEL); with n odd the last one
    pairs with the first of the permutation."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + 104729))
    return (torch.cat([order, order[:1]]) if n % 2 else order).view(-1, 2)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to CUDA from pinned memory, without blocking the host."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


class Feed:
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
