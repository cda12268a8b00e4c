"""From a recipe's `data` section to the decoded training and evaluation images on the training device: the
evaluation split (test, validation, a folder, or a held-out part), one fold (STL-10), streaming (ImageNet), class
re-numbering by name, normalisation; and the batch helpers training and evaluation share."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from clcli.errors import ClcliError

from ._batch import channel_stats, normalize
from ._load import ImageTensors, SplitNotFound, load_image_tensors
from ._split import stratified_holdout

QUICKSTART_DIR: Path = Path(__file__).resolve().parent.parent / "datasets" / "quickstart"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def source_path(source: str) -> str:
    """A recipe's data source as a path or hub id: `builtin:quickstart` is the shipped subset."""
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name != "quickstart":
            raise ClcliError(f"unknown built-in dataset '{name}' (available: quickstart)")
        return str(QUICKSTART_DIR)
    return source


@dataclass
class Data:
    train_images: torch.Tensor   # uint8 [N, C, H, W] on the training device
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class LoadedData(Data):
    """The decoded data plus what loading it decided: where the evaluation images come from (in words), the
    unreadable images left out ({"image", "reason", "split"}) and notes for the user."""

    evaluation: str = ""
    skipped: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # data.validate (and train.keep_best): a part of the training split held out, evaluated every epoch to select
    # the best epoch or a configuration (never the test split, which stays the reported one)
    val_images: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None


def load_data(recipe, device) -> LoadedData:
    """Decode the training and evaluation images once into uint8 tensors (cached on disk) and move them to the
    training device. Evaluation images: `data.val_source` if set, else the `test_split`, else a 'validation' split,
    else a stratified part of the training split held out with `data.val_seed`. Class names come from the training
    split; the evaluation labels are mapped onto them by name."""
    from ._autoaugment import check

    cfg = recipe.data
    check(cfg.auto_augment, stream=cfg.stream)  # before any image is decoded
    if not cfg.source:
        raise ClcliError(f"recipe '{recipe.name}' names no dataset; pass --data FOLDER (an image folder "
                         f"class_name/*.jpg, a folder of parquet/arrow files, or a hub id)")
    source = source_path(cfg.source)
    if cfg.stream:  # images stay on disk, decoded batch by batch in DataLoader workers (ImageNet)
        return load_stream(recipe, source, device)
    # Images are decoded at the size the networks are planned for (photos of any size become input_size squares),
    # unless data.image_size says otherwise.
    image_size = cfg.image_size if cfg.image_size is not None else recipe.input_size
    common = dict(image_column=cfg.image_column, label_column=cfg.label_column, image_size=image_size)
    train = load_image_tensors(source, cfg.train_split, config=cfg.config,
                               limit=None if cfg.folds else cfg.train_limit, **common)
    if cfg.folds:  # one predefined fold of the training split (STL-10); train_limit applies within the fold
        train = select_fold(train, recipe, source)
    notes = []
    if cfg.val_source:
        test = load_image_tensors(source_path(cfg.val_source), None, limit=cfg.test_limit, **common)
        evaluation, eval_split = f"the folder {cfg.val_source}", "validation"
    else:
        try:
            test, eval_split = evaluation_split(source, cfg, **common)
            evaluation = f"split '{eval_split}'"
            if eval_split != cfg.test_split:
                notes.append(f"no '{cfg.test_split}' split in {cfg.source}: evaluating on its '{eval_split}' split")
        except SplitNotFound:
            train, test = _hold_out(train, cfg)
            evaluation, eval_split = (f"{len(test)} images held out of split '{cfg.train_split}' "
                                      f"({cfg.val_fraction:.0%} of each class, seed {cfg.val_seed})"), "held-out"
            notes.append(f"no '{cfg.test_split}' or 'validation' split in {cfg.source}: holding out "
                         f"{cfg.val_fraction:.0%} of each class for validation (stratified, seed "
                         f"{cfg.val_seed}): {len(train)} training, {len(test)} validation images")
    labels = on_classes(test.labels, test.class_names, train.class_names,
                        what=f"the evaluation images ({evaluation})", lacking="the training images lack")
    test = ImageTensors(test.images, labels, list(train.class_names), test.skipped)
    skipped = ([dict(s, split=cfg.train_split) for s in train.skipped]
               + [dict(s, split=eval_split) for s in test.skipped])
    if skipped:
        shown = "; ".join(f"{s['image']}: {s['reason']}" for s in skipped[:10])
        more = f"; and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        notes.append(f"skipped {len(skipped)} unreadable image{'s' if len(skipped) > 1 else ''}: {shown}{more}")
    val = None
    if validates(recipe):
        keep, held = stratified_holdout(train.labels, cfg.val_fraction, cfg.val_seed)
        val = ImageTensors(train.images[held], train.labels[held], list(train.class_names))
        train = ImageTensors(train.images[keep], train.labels[keep], list(train.class_names), train.skipped)
        use = ("train.keep_best selects each network's best epoch on" if recipe.train.keep_best
               else "each epoch is also evaluated on")
        notes.append(f"{use} {len(val)} training images held out ({cfg.val_fraction:.0%} of each class, seed "
                     f"{cfg.val_seed}); {evaluation} stays the reported evaluation")
    mean, std = normalization(recipe, channels=train.images.shape[1], train_images=train.images)
    return LoadedData(train.images.to(device), train.labels.to(device), test.images.to(device),
                      test.labels.to(device), list(train.class_names), mean, std, evaluation, skipped,
                      notes, val.images.to(device) if val is not None else None,
                      val.labels.to(device) if val is not None else None)


def validates(recipe) -> bool:
    """Whether a validation split is held out of the training images (data.validate, or train.keep_best)."""
    return recipe.data.validate or recipe.train.keep_best


def normalization(recipe, *, channels: int, train_images=None) -> tuple[tuple, tuple]:
    """(mean, std) per channel for `data.normalize`: the training images' own statistics (`dataset`, in memory only),
    ImageNet's, the first model's pretrained config (3 values: grayscale is repeated to RGB before normalising), or
    none."""
    kind = recipe.data.normalize
    if kind == "dataset":
        mean, std = channel_stats(train_images)
    elif kind == "imagenet":
        mean, std = IMAGENET_MEAN[:channels], IMAGENET_STD[:channels]
    elif kind == "pretrained":
        from clcli.models import pretrained_config

        pretrained = pretrained_config(recipe.models[0])
        mean, std = pretrained["mean"], pretrained["std"]
    else:
        mean, std = (0.0,) * channels, (1.0,) * channels
    return tuple(mean), tuple(std)


def _hold_out(train, cfg):
    """(training part, held-out part) of a decoded split, stratified by class; test_limit applies to the held-out."""
    keep, held = stratified_holdout(train.labels, cfg.val_fraction, cfg.val_seed)
    if cfg.test_limit is not None:
        held = held[: cfg.test_limit]
    names = list(train.class_names)
    return (ImageTensors(train.images[keep], train.labels[keep], names, train.skipped),
            ImageTensors(train.images[held], train.labels[held], names))


def evaluation_split(source: str, cfg, **common):
    """(decoded images, split name) of the data's evaluation split: `cfg.test_split`, else 'validation'. Raises
    SplitNotFound (naming the splits there are) when the data has neither."""
    kwargs = dict(common, config=cfg.config, limit=cfg.test_limit)
    try:
        return load_image_tensors(source, cfg.test_split, **kwargs), cfg.test_split
    except SplitNotFound as e:
        if "validation" not in e.available:
            raise
    return load_image_tensors(source, "validation", **kwargs), "validation"


def on_classes(labels, names: list[str], onto: list[str], *, what: str, lacking: str):
    """`labels` (numbered by `names`) re-numbered by class name onto the class list `onto`: an evaluation set may
    lack some classes or list them in another order. A class `onto` does not have is an error:
    "{what} have classes {lacking}: ..."."""
    if list(names) == list(onto):
        return labels
    index = {name: i for i, name in enumerate(onto)}
    unknown = [name for name in names if name not in index]
    if unknown:
        raise ClcliError(f"{what} have classes {lacking}: {', '.join(unknown[:5])}")
    return torch.tensor([index[name] for name in names], dtype=torch.int64, device=labels.device)[labels]


def select_fold(train, recipe, source: str):
    """The training images of fold `recipe.data.fold` (all of them when it is None), then `train_limit`."""
    from ._folds import fold_file, fold_rows, read_folds

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


def load_stream(recipe, source: str, device) -> "LoadedData":
    """Both splits as `StreamSplit`s: labels now, images decoded by DataLoader workers batch by batch. 
    Streamed images are always RGB."""
    from ._stream import StreamSplit

    cfg = recipe.data
    if cfg.folds:
        raise ClcliError("data.folds works with in-memory data only; set data.stream=false")
    if validates(recipe):
        raise ClcliError(f"{'train.keep_best' if recipe.train.keep_best else 'data.validate'} holds a validation part "
                         "out of the training images in memory; it does not work with data.stream (pass a separate "
                         "folder with --val and select on it yourself)")
    if cfg.normalize == "dataset":
        raise ClcliError("data.normalize=dataset needs a pass over every training image, which streaming avoids; "
                         "use data.normalize=imagenet (or none)")
    if cfg.image_size is not None:
        raise ClcliError("data.image_size resizes images once in memory; with data.stream the transforms crop to "
                         "input_size (and data.test_resize), so drop data.image_size")
    size = recipe.input_size
    if size is None:
        raise ClcliError("data.stream needs input_size")
    mean, std = normalization(recipe, channels=3)  # streamed images are always RGB
    common = dict(size=size, padding=cfg.padding, test_resize=cfg.test_resize, config=cfg.config,
                  image_column=cfg.image_column, label_column=cfg.label_column, workers=cfg.workers, device=device)
    train = StreamSplit(source, cfg.train_split, train=True, augment=cfg.augment, auto_augment=cfg.auto_augment,
                        fill=mean, limit=cfg.train_limit, **common)
    test = StreamSplit(source, cfg.test_split, train=False, limit=cfg.test_limit, **common)
    # StreamSplit.batches reads its labels from `labels`: re-numbered there, evaluation uses the training classes
    test.labels = on_classes(test.labels, test.class_names, train.class_names,
                             what=f"the evaluation images (split '{cfg.test_split}')",
                             lacking="the training images lack")
    test.class_names = list(train.class_names)
    return LoadedData(train, train.labels, test, test.labels, list(train.class_names), tuple(mean), tuple(std))


def to_input(images_u8: torch.Tensor, mean, std, channels_last: bool = False) -> torch.Tensor:
    """uint8 images as the networks' normalised float input (optionally channels-last: on a GPU made so in the one
    copy that converts the batch to float)."""
    return normalize(images_u8, mean, std, channels=3,
                     memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def eval_batches(images, labels, batch_size: int):
    """(uint8 images, labels) in order, batch by batch; a streamed split (StreamSplit) decodes its
    batches in DataLoader workers."""
    if hasattr(images, "batches"):
        return images.batches(batch_size)
    return ((images[start:start + batch_size], labels[start:start + batch_size])
            for start in range(0, len(images), batch_size))


def streamed_skips(data) -> list[dict]:
    """The images of streamed splits that could not be decoded so far ({"image", "reason", "split"})."""
    found = []
    for split, images in (("train", data.train_images), ("evaluation", data.test_images)):
        found += [{"image": k, "reason": v, "split": split} for k, v in getattr(images, "skipped", {}).items()]
    return found
