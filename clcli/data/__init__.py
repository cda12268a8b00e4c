"""Data layer: decode a split once into uint8 tensors (cached), then augment and normalise whole batches on device.

Public API:
    load_data(recipe, device) -> LoadedData                  a recipe's training and evaluation images, on device
    normalization(recipe, channels=)                         the recipe's (mean, std)
    evaluation_split(source, data_cfg, ...)                  a source's test split, else its validation split
    on_classes(labels, names, onto, what=, lacking=)         labels re-numbered by class name onto another list
    source_path(source)                                      a recipe's data source as a path (builtin:quickstart)
    fold_file(folds, source), read_folds(path)               the STL-10 fold-indices file
    to_input(images, mean, std)                              uint8 batch -> normalised network input
    eval_batches(images, labels, batch_size)                 (images, labels) in order, in memory or streamed
    streamed_skips(data)                                     images a streamed split could not decode so far
    load_image_tensors(source, split, ...) -> ImageTensors   decode (or load from cache) one split
    channel_stats(images)                                    per-channel mean/std in [0, 1]
    BatchAugment(kind, padding, auto_augment=, fill=)(images, generator)   'none' | 'flip' | 'crop_flip', then
                                                             timm's auto-augment per image, batched by draw
    batch_erasing(data_cfg, device)                          timm's RandomErasing for normalised batches, or None
    normalize(images, mean, std, channels=3)                 uint8 -> float32, grayscale repeated to RGB
    epoch_batches(n, batch_size, seed=, epoch=)              index tensors that depend only on (seed, epoch)
    stratified_holdout(labels, fraction, seed)               (train, held-out) indices, per class, seeded
    image_pixels(pil_image, channels, (W, H))                one PIL image as training decodes it (predict uses it)
    QUICKSTART_DIR                                           the shipped CIFAR-10 subset (see its README.md)

It imports torch.
"""
from ._batch import AUGMENTS, BatchAugment, batch_erasing, channel_stats, epoch_batches, normalize
from ._load import CACHE_FORMAT_VERSION, DECODE_ERRORS, ImageTensors, SplitNotFound, image_pixels, load_image_tensors
from ._folds import fold_file, read_folds
from ._prepare import (QUICKSTART_DIR, Data, LoadedData, eval_batches, evaluation_split, load_data, normalization,
                       on_classes, source_path, streamed_skips, to_input)
from ._split import stratified_holdout

ImageTensors.__module__ = __name__

__all__ = ["ImageTensors", "load_image_tensors", "channel_stats", "BatchAugment", "normalize", "epoch_batches",
           "stratified_holdout", "SplitNotFound", "image_pixels", "DECODE_ERRORS", "QUICKSTART_DIR", "AUGMENTS",
           "CACHE_FORMAT_VERSION", "Data", "LoadedData", "load_data", "normalization", "evaluation_split", "on_classes",
           "source_path", "fold_file", "read_folds", "to_input", "eval_batches", "streamed_skips", "batch_erasing"]
