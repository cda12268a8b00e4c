"""Streaming splits: images stay on disk and are decoded (and augmented) in DataLoader workers every epoch.

For datasets too large to decode into memory (ImageNet: 1.28 M JPEGs). The split is opened with `datasets` as for
the in-memory path (a local Hub-layout folder, an image folder class_name/*.jpg, a `save_to_disk` folder or a Hub
id), which gives the labels and class names at once and, per row, the stored image bytes or file path. Workers
decode with PIL and transform with torchvision into uint8 [3, S, S] tensors, so the training loop normalises a
streamed batch exactly like an in-memory one.

    train: rrc_flip  RandomResizedCrop(S) + horizontal flip (the ImageNet recipe)
           crop_flip resize shorter side to S, center crop S, pad + random crop S, flip
           flip      resize shorter side to S, center crop S, flip
           none      resize shorter side to S, center crop S
    then, with data.auto_augment: timm's auto-augment stage as timm's create_transform builds it (or torchvision's
           TrivialAugmentWide), on the PIL image
    test:  resize shorter side to test_resize (default S), center crop S
Random erasing is not done here: it works on normalised images, so the training loop erases a streamed batch on the
device exactly as an in-memory one (`batch_erasing`).

An image that cannot be decoded is skipped, as on the in-memory path: in a training batch its slot gets a copy of
another image of the same batch (with that image's label), so batch shapes never change; in evaluation it is left
out of the count. Each one is reported once through `StreamSplit.skipped`.
"""
from __future__ import annotations

import hashlib
import os
from typing import Iterator, Sequence

import torch

from clcli.errors import ClcliError, one_line

from . import _load

STREAM_AUGMENTS = ("none", "flip", "crop_flip", "rrc_flip")


def _transform(train: bool, size: int, augment: str, padding: int, test_resize: int | None,
               auto_augment: str | None = None, fill: Sequence[float] | None = None):
    """The PIL -> uint8 [3, S, S] transform of a split; `fill`: the normalisation mean (what auto-augment fills)."""
    from torchvision import transforms as T

    from ._autoaugment import stream_transform

    if augment not in STREAM_AUGMENTS:
        raise ClcliError(f"unknown augment '{augment}' (choose from {', '.join(STREAM_AUGMENTS)})")
    if not train:
        return T.Compose([T.Resize(test_resize or size), T.CenterCrop(size), T.PILToTensor()])
    if augment == "rrc_flip":
        steps = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(size), T.CenterCrop(size)]
        if augment == "crop_flip":
            steps.append(T.RandomCrop(size, padding=padding))
        if augment in ("crop_flip", "flip"):
            steps.append(T.RandomHorizontalFlip())
    if auto_augment:
        steps.append(stream_transform(auto_augment, size, fill))
    return T.Compose([*steps, T.PILToTensor()])


class _Decoded(torch.utils.data.Dataset):
    """Row i -> (uint8 [3, S, S], None or (image, why it could not be decoded)): decoded with PIL in the worker,
    RGB, transformed. An unreadable image gives zeros of the right shape, so the batch still collates."""

    def __init__(self, images, column: str, transform, size: int):
        self.images = images          # a `datasets.Dataset` with only the image column, arrow format
        self.column = column
        self.transform = transform
        self.size = size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item) -> tuple[torch.Tensor, tuple[str, str] | None]:
        """`item`: a row, or (row, seed) for a training image, whose random transform draws from `seed` alone: the
        same augmentation whichever worker decodes it, in whichever epoch of a persistent worker."""
        i, seed = item if isinstance(item, tuple) else (item, None)
        if seed is not None:
            import random

            import numpy as np

            torch.manual_seed(seed)          # torchvision's transforms
            random.seed(seed)                # timm's auto-augment: magnitudes, probabilities
            np.random.seed(seed % (1 << 32))  # and RandAugment's choice of ops
        record = self.images[int(i)].column(0)[0].as_py() or {}
        rec = (record.get("bytes"), record.get("path"))
        try:
            im = _load._open(rec, int(i), self.column)
            return self.transform(im.convert("RGB")), None
        except _load._Unreadable as e:
            return self._blank(), (e.where, e.reason)
        except _load.DECODE_ERRORS as e:  # truncated data shows up when the pixels are decoded
            return self._blank(), (_load._where(rec, int(i)), f"not a readable image ({one_line(e)})")

    def _blank(self) -> torch.Tensor:
        return torch.zeros(3, self.size, self.size, dtype=torch.uint8)


def _collate(items: list[tuple[torch.Tensor, tuple | None]]) -> tuple[torch.Tensor, list[tuple | None]]:
    return torch.stack([image for image, _ in items]), [problem for _, problem in items]


class StreamSplit:
    """One split read from disk on demand. `labels` (int64, on `device`) and `class_names` are known up front;
    `batches` yields test batches in order, `epoch_feed` yields training batches in a given index order."""

    def __init__(self, source: str, split: str | None, *, train: bool, size: int, augment: str = "none",
                 padding: int = 4, test_resize: int | None = None, auto_augment: str | None = None,
                 fill: Sequence[float] | None = None, config: str | None = None,
                 image_column: str | None = None, label_column: str | None = None, limit: int | None = None,
                 workers: int | None = None, device: torch.device | str = "cpu", cache_dir: str | None = None):
        import datasets

        if limit is not None and (int(limit) != limit or limit < 1):
            raise ClcliError(f"limit must be a whole number >= 1, got {limit}")
        local = _load._local_folder(source)
        if local is not None:
            loaded = _load._load_local(local, config, _load._cache_root(cache_dir))
        else:
            loaded = _load._load_hub(source, config)
        dataset = _load._select_split(loaded, split, source)
        features = dataset.features
        split_name = split or "the only split"
        image_col = _load._pick_column(features, image_column, datasets.Image, _load._IMAGE_NAMES, "image",
                                       split_name, source)
        label_col = _load._pick_label_column(dataset, label_column, split_name, source)
        if not isinstance(features[image_col], datasets.Image):
            raise ClcliError(f"column '{image_col}' is not an image column "
                             f"(feature {type(features[image_col]).__name__})")
        n = len(dataset) if limit is None else min(int(limit), len(dataset))
        if n == 0:
            raise ClcliError(f"split '{split_name}' of {source} has no rows")
        if n < len(dataset):
            dataset = dataset.select(range(n))
        label_table = dataset.select_columns([label_col]).with_format("arrow")[:n]
        labels, self.class_names = _load._labels(label_table.column(label_col), features[label_col], label_col,
                                                 split_name)
        self.device = torch.device(device)
        self.labels = torch.from_numpy(labels).to(self.device)
        self.size = int(size)
        self.train = train
        self.workers = default_workers() if workers is None else int(workers)
        self.dataset = _Decoded(dataset.select_columns([image_col]).with_format("arrow"), image_col,
                                _transform(train, self.size, augment, padding, test_resize, auto_augment, fill),
                                self.size)
        self.skipped: dict[str, str] = {}  # image -> reason, in the order met; filled as batches are decoded
        self._loaders: dict = {}  # kind -> (its batch sampler, its DataLoader), made when first read

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return (f"StreamSplit({len(self)} images, {'train' if self.train else 'test'}, {self.size}px, "
                f"{self.workers} workers)")

    def _loader(self, kind: str, batches: list) -> "torch.utils.data.DataLoader":
        """The split's DataLoader for `kind` ("train" or "eval"), made once: its workers persist from epoch to epoch
        (and evaluation to evaluation) instead of being forked again; each pass reads the batches given now."""
        loaders = self._loaders
        if kind not in loaders:
            sampler = _Batches()
            loaders[kind] = (sampler, torch.utils.data.DataLoader(
                self.dataset, batch_sampler=sampler, num_workers=self.workers, collate_fn=_collate,
                pin_memory=self.device.type == "cuda", persistent_workers=self.workers > 0))
        sampler, loader = loaders[kind]
        sampler.batches = batches
        return loader

    def _readable(self, problems: list[tuple | None]) -> torch.Tensor:
        """Which slots of a decoded batch hold a real image; records the others in `skipped`."""
        for problem in problems:
            if problem is not None:
                self.skipped.setdefault(*problem)
        return torch.tensor([p is None for p in problems], dtype=torch.bool)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images [B', 3, S, S], labels [B']) on `device`, in row order (evaluation); unreadable images are
        left out, so B' may be smaller than the batch size."""
        order = torch.arange(len(self)).split(int(batch_size))
        for (images, problems), idx in zip(self._loader("eval", [b.tolist() for b in order]), order):
            ok = self._readable(problems)
            if not bool(ok.all()):  # copies only for a batch that has an unreadable image
                images, idx = images[ok], idx[ok]
            yield images.to(self.device, non_blocking=True), self.labels[idx.to(self.device)]

    def epoch_feed(self, order: Sequence[torch.Tensor], *, seed: int,
                   epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """For each index batch of `order` (training): uint8 images [B, 3, S, S] on `device`, and None, or, where
        some images could not be decoded, the position in the batch whose image (and label) each slot holds. Each
        image's augmentation draws from its own seed, from (seed, epoch, image): one run per seed, whatever the
        number of workers, and a resumed epoch draws what the uninterrupted one drew."""
        digest = hashlib.sha256(f"clcli.stream:{int(seed)}:{int(epoch)}".encode()).digest()
        base = int.from_bytes(digest[:8], "little")
        batches = [[(i, (base + i * 1_000_003) % (1 << 63)) for i in b.tolist()] for b in order]
        for images, problems in self._loader("train", batches):
            ok = self._readable(problems)
            if bool(ok.all()):
                yield images.to(self.device, non_blocking=True), None
                continue
            if not bool(ok.any()):
                where, reason = problems[0]
                raise ClcliError(f"no image of a training batch could be decoded (the first, {where}: {reason}); "
                                 "check the data")
            # the k-th unreadable slot takes the k-th readable image (cycling): a copy, never a blank
            readable = ok.nonzero().flatten()
            positions = torch.arange(len(problems))
            bad = (~ok).nonzero().flatten()
            positions[bad] = readable[torch.arange(len(bad)) % len(readable)]
            yield images[positions].to(self.device, non_blocking=True), positions


class _Batches:
    """A batch sampler whose batches are set before each pass (the loader, and its workers, stay)."""

    batches: list = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def default_workers() -> int:
    """DataLoader workers for a streamed split: the CPUs this process may use, shared with the other torchrun
    processes of this machine (LOCAL_WORLD_SIZE), one left for the training process; at most 32."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    per_process = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(32, per_process - 1))


__all__ = ["StreamSplit", "STREAM_AUGMENTS", "default_workers"]
