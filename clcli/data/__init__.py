"""Data layer: decode a split once into uint8 tensors (cached), then augment and normalise whole batches on device.

Public API:
    load_image_tensors(source, split, ...) -> ImageTensors   decode (or load from cache) one split
    channel_stats(images)                                    per-channel mean/std in [0, 1]
    BatchAugment(kind, padding)(images, generator)           'none' | 'flip' | 'crop_flip', vectorised
    normalize(images, mean, std, channels=3)                 uint8 -> float32, grayscale repeated to RGB
    epoch_batches(n, batch_size, seed=, epoch=)              index tensors that depend only on (seed, epoch)
    stratified_holdout(labels, fraction, seed)               (train, held-out) indices, per class, seeded
    image_pixels(pil_image, channels, (W, H))                one PIL image as training decodes it (predict uses it)
    QUICKSTART_DIR                                           the shipped CIFAR-10 subset (see its README.md)

Only training code imports this package; it imports torch.
"""
from pathlib import Path

from ._batch import AUGMENTS, BatchAugment, channel_stats, epoch_batches, normalize
from ._load import CACHE_FORMAT_VERSION, DECODE_ERRORS, ImageTensors, SplitNotFound, image_pixels, load_image_tensors
from ._split import stratified_holdout

ImageTensors.__module__ = __name__

QUICKSTART_DIR: Path = Path(__file__).resolve().parent.parent / "datasets" / "quickstart"

__all__ = ["ImageTensors", "load_image_tensors", "channel_stats", "BatchAugment", "normalize", "epoch_batches",
           "stratified_holdout", "SplitNotFound", "image_pixels", "DECODE_ERRORS", "QUICKSTART_DIR", "AUGMENTS",
           "CACHE_FORMAT_VERSION"]
