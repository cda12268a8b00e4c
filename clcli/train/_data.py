"""The two variants of `load_data`: one fold of the training split (STL-10), and streamed splits (ImageNet)."""
from __future__ import annotations

from clcli.errors import ClcliError


def select_fold(train, recipe, source: str):
    """The training images of fold `recipe.data.fold` (all of them when it is None), then `train_limit`."""
    from clcli.data import ImageTensors
    from clcli.data._folds import fold_file, fold_rows, read_folds

    cfg = recipe.data
    if cfg.fold is None:
        return train
    path = fold_file(cfg.folds, source)
    if train.skipped:
        raise ClcliError(f"{len(train.skipped)} training images could not be decoded (first: "
                         f"{train.skipped[0]['image']}); the rows of {path} would no longer match the training split")
    rows = fold_rows(read_folds(path), cfg.fold, len(train), path)
    if cfg.train_limit is not None:
        rows = rows[: cfg.train_limit]
    return ImageTensors(train.images[rows], train.labels[rows], list(train.class_names))


def load_stream(recipe, source: str, device, data_cls):
    """Both splits as `StreamSplit`s: labels now, images decoded by DataLoader workers batch by batch. Returns
    `data_cls(train, train labels, test, test labels, class names, mean, std)`; streamed images are always RGB."""
    from clcli.data._stream import StreamSplit

    cfg = recipe.data
    if cfg.folds:
        raise ClcliError("data.folds works with in-memory data only; set data.stream=false")
    if cfg.normalize == "dataset":
        raise ClcliError("data.normalize=dataset needs a pass over every training image, which streaming avoids; "
                         "use data.normalize=imagenet (or none)")
    if cfg.image_size is not None:
        raise ClcliError("data.image_size resizes images once in memory; with data.stream the transforms crop to "
                         "input_size (and data.test_resize), so drop data.image_size")
    size = recipe.input_size
    if size is None:
        raise ClcliError("data.stream needs input_size")
    common = dict(size=size, padding=cfg.padding, test_resize=cfg.test_resize, config=cfg.config,
                  image_column=cfg.image_column, label_column=cfg.label_column, workers=cfg.workers, device=device)
    train = StreamSplit(source, cfg.train_split, train=True, augment=cfg.augment, limit=cfg.train_limit, **common)
    test = StreamSplit(source, cfg.test_split, train=False, limit=cfg.test_limit, **common)
    from clcli.train import normalization, on_classes

    # StreamSplit.batches reads its labels from `labels`: re-numbered there, evaluation uses the training classes
    test.labels = on_classes(test.labels, test.class_names, train.class_names,
                             what=f"the evaluation images (split '{cfg.test_split}')", lacking="the training images lack")
    test.class_names = list(train.class_names)

    mean, std = normalization(recipe, channels=3)  # streamed images are always RGB
    return data_cls(train, train.labels, test, test.labels, list(train.class_names), tuple(mean), tuple(std))


__all__ = ["select_fold", "load_stream"]
