"""Load an image-classification split into uint8 tensors, decoding once and caching the result as safetensors.

Flow: resolve the source (local folder or Hub id) -> cache key -> cache hit? return : load with `datasets`,
pick the image/label columns, decode every image with PIL into one preallocated array, write the cache atomically.
For a local folder the key comes from the files' sizes and mtimes, so a cache hit never imports `datasets`.
Unreadable images (corrupt, truncated, not an image) are skipped and listed in `ImageTensors.skipped`, so one bad
file in a photo folder does not stop a run.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from clcli.files import atomic_path
from clcli.errors import ClcliError, one_line

log = logging.getLogger("clcli.data")

CACHE_FORMAT_VERSION = 1
_CACHE_KIND = "clcli.image_tensors"
_IMAGE_NAMES = ("image", "img", "images", "pixel_values", "picture")
_LABEL_NAMES = ("label", "labels", "fine_label", "class", "target", "y")
# Modes decoded as one channel; everything else (RGB, RGBA, CMYK, P, YCbCr, LAB, HSV, ...) becomes RGB.
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


class SplitNotFound(ClcliError):
    """The asked-for split is not in the dataset; `available` names the splits that are."""

    def __init__(self, message: str, available: list[str]):
        super().__init__(message)
        self.available = available


@dataclass
class ImageTensors:
    """One decoded split: uint8 images [N, C, H, W] (C = 1 or 3), int64 labels [N], and the class names.
    `skipped` lists the images that could not be decoded ({"image": path or row, "reason": ...}); they are not in
    `images`."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    skipped: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load_image_tensors(source: str, split: str | None, *, config: str | None = None, image_column: str | None = None,
                       label_column: str | None = None, image_size: int | None = None, limit: int | None = None,
                       cache_dir: str | None = None) -> ImageTensors:
    """Decode one split of an image-classification dataset into uint8 tensors, cached on disk.

    source: a local folder (parquet/arrow layout that `datasets.load_dataset(folder, config)` reads, a folder
    written by `save_to_disk`, or an image folder class_name/*.jpg), or a Hub id such as 'uoft-cs/cifar10'.
    split=None takes the source's only split (an image folder without train/ and val/ subfolders has just one).
    The image column (feature Image) and label column (ClassLabel) are found when not given. Grayscale stays one
    channel, every other mode becomes RGB; images are resized (PIL bilinear) to image_size x image_size when
    image_size is given or when their sizes differ. limit=n keeps the first n rows; unreadable images among them
    are skipped and listed in the result's `skipped`.
    cache_dir: root of clcli's cache (default $CLCLI_CACHE or ~/.cache/clcli); tensors go to <cache_dir>/data.
    """
    if limit is not None and (int(limit) != limit or limit < 1):
        raise ClcliError(f"limit must be a whole number >= 1, got {limit}")
    if image_size is not None and (int(image_size) != image_size or image_size < 1):
        raise ClcliError(f"image size must be a whole number >= 1, got {image_size}")
    root = _cache_root(cache_dir)
    local = _local_folder(source)
    request = {"split": split, "config": config, "image_column": image_column, "label_column": label_column,
               "image_size": image_size, "limit": limit, "version": CACHE_FORMAT_VERSION}

    dataset = None
    if local is not None:
        identity = {"files": _folder_fingerprint(local)}
    else:
        dataset = _select_split(_load_hub(source, config), split, source)
        identity = {"hub": source, "fingerprint": dataset._fingerprint}
    key = _hash({**identity, **request})
    path = root / "data" / f"{_slug(source, local)}-{_slug(split or 'only', None)}-{key[:20]}.safetensors"

    cached = _read_cache(path, key)
    if cached is not None:
        return cached

    from clcli import files

    files.check_output_dir(root, "clcli's cache folder (CLCLI_CACHE)")  # before decoding, not after
    if dataset is None:
        dataset = _select_split(_load_local(local, config, root), split, source)
    result = _decode_split(dataset, source, split, image_column, label_column, image_size, limit)
    _write_cache(path, key, result, source, split)
    return result


# --- sources --------------------------------------------------------------------------------------------------


def _cache_root(cache_dir: str | None) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get("CLCLI_CACHE") or os.path.join("~", ".cache", "clcli")
    return Path(cache_dir).expanduser()


def _local_folder(source: str) -> Path | None:
    """The folder `source` names, None for a Hub id; a path that does not exist is an error."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ClcliError(f"data source {source} is a file; pass the folder that holds the dataset")
        return path.resolve()
    if not _HUB_ID.match(source) or source.startswith((".", "~")) or os.path.isabs(source):
        raise ClcliError(f"data folder not found: {source}")
    return None


def _folder_fingerprint(folder: Path) -> list[list]:
    """Relative path, size and mtime of every file under `folder` (hidden files and folders skipped)."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            st = os.stat(full)
            entries.append([os.path.relpath(full, folder).replace(os.sep, "/"), st.st_size, st.st_mtime_ns])
    if not entries:
        raise ClcliError(f"data folder {folder} holds no files")
    return entries


def _load_local(folder: Path, config: str | None, root: Path):
    import datasets

    if (folder / "dataset_dict.json").exists() or (folder / "state.json").exists():
        if config is not None:
            raise ClcliError(f"{folder} was written by save_to_disk and has no configs; drop the config")
        load = lambda: datasets.load_from_disk(str(folder))  # noqa: E731
    else:
        # Arrow copies of local folders live in clcli's cache, next to the tensors made from them.
        load = lambda: datasets.load_dataset(str(folder), config, cache_dir=str(root / "hf-datasets"))  # noqa: E731
    # A local folder converts in a moment: keep `datasets`' progress bars out of clcli's console.
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        return load()
    except Exception as e:  # whatever `datasets` raises while reading the user's folder
        raise ClcliError(f"cannot read dataset folder {folder}: {one_line(e)}") from e
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def _load_hub(hub_id: str, config: str | None):
    from clcli import hub

    offline = hub.offline_reason()  # no network: `datasets` in offline mode (its cache only) instead of retrying
    import datasets

    local = "pass a local folder with --data FOLDER (an image folder class_name/*.jpg, or parquet/arrow files)"
    try:
        return datasets.load_dataset(hub_id, config)
    except Exception as e:  # offline, unknown id, gated, bad config: the user has to point elsewhere
        if offline:
            raise ClcliError(f"the dataset '{hub_id}' is not a local folder; it is on the Hugging Face Hub, not in the "
                             f"local cache, and the Hub cannot be reached ({offline}); {local}") from None
        raise ClcliError(f"'{hub_id}' is not a local folder and could not be loaded from the Hugging Face Hub "
                         f"({one_line(e)}); {local}, or set HF_HUB_OFFLINE=1 to use only the local cache") from None


def _select_split(loaded, split: str | None, source: str):
    import datasets

    if isinstance(loaded, (datasets.DatasetDict, dict)):
        available = list(loaded)
        if split is None and len(available) == 1:
            return loaded[available[0]]
        if split is None:
            raise ClcliError(f"{source} has several splits ({', '.join(available)}); a validation folder must have "
                             f"one (an image folder class_name/*.jpg without train/ and val/ subfolders)")
        if split not in loaded:
            raise SplitNotFound(f"split '{split}' not found in {source} (available: {', '.join(available) or 'none'})",
                                available)
        return loaded[split]
    # A single saved Dataset carries its split name (or none).
    name = str(loaded.split) if loaded.split is not None else "train"
    if split is not None and split != name:
        raise SplitNotFound(f"split '{split}' not found in {source} (available: {name})", [name])
    return loaded


# --- columns and decoding -------------------------------------------------------------------------------------


def _pick_column(features, wanted: str | None, feature_type, preferred: tuple[str, ...], what: str,
                 split: str, source: str) -> str:
    columns = list(features)
    if wanted is not None:
        if wanted not in features:
            raise ClcliError(f"column '{wanted}' not found in split '{split}' of {source} "
                             f"(columns: {', '.join(columns)})")
        return wanted
    found = [name for name, feature in features.items() if isinstance(feature, feature_type)]
    if not found:
        option = f"--set data.{what}_column=NAME (recipe key data.{what}_column)"
        kind = "Image" if what == "image" else "ClassLabel"
        raise ClcliError(f"no {what} column (feature {kind}) in split '{split}' of {source} "
                         f"(columns: {', '.join(columns)}); name one with {option}")
    for name in preferred:
        if name in found:
            return name
    return found[0]


def _pick_label_column(dataset, wanted: str | None, split: str, source: str) -> str:
    import datasets

    features = dataset.features
    if wanted is None and not any(isinstance(feature, datasets.ClassLabel) for feature in features.values()):
        _refuse_an_image_folder_without_classes(dataset, source)
    return _pick_column(features, wanted, datasets.ClassLabel, _LABEL_NAMES, "label", split, source)


# Folder names `datasets` reads as a split of an image folder (train/cat/*.jpg), not as a class.
_SPLIT_FOLDERS = {"train", "training", "val", "valid", "validation", "dev", "test", "testing", "eval", "evaluation"}


def _refuse_an_image_folder_without_classes(dataset, source: str) -> None:
    """`datasets`' image folder labels images by their folders only when it finds two or more class folders, every
    image one level down; otherwise it yields the images alone, and the cause is the folder's layout (one class
    folder, images in no class folder, or at different depths), not a label column to name."""
    import datasets

    features = dataset.features
    local = _local_folder(source)
    column = next(iter(features))
    if (local is None or dataset.info.builder_name != "imagefolder" or len(features) != 1
            or not isinstance(features[column], datasets.Image)):
        return
    paths = dataset.select_columns([column]).with_format("arrow")[:][column].combine_chunks().field("path")
    folders = sorted({Path(p).parent for p in paths.to_pylist() if p is not None})
    if not folders or not all(folder.is_relative_to(local) for folder in folders):
        return
    folders = [folder.relative_to(local) for folder in folders]
    depths = sorted({len(folder.parts) for folder in folders})
    if len(depths) > 1:
        shallow = next(f for f in folders if len(f.parts) == depths[0])
        deep = next(f for f in folders if len(f.parts) == depths[-1])
        cause = f"its images lie at different depths ({_named(shallow)} and {_named(deep)})"
    elif len(folders) == 1 and (depths[0] == 0 or (depths[0] == 1 and folders[0].name.lower() in _SPLIT_FOLDERS)):
        cause = f"its images lie in {_named(folders[0])}, in no class folder"
    elif len(folders) == 1:
        cause = f"one class folder found ('{folders[0].as_posix()}')"
    else:
        cause = "its folders gave its images no class"
    raise ClcliError(f"{source}: {cause}; an image folder needs at least two class folders, one per class, with the "
                     f"images inside them (class_name/*.jpg)")


def _named(folder: Path) -> str:
    return f"'{folder.as_posix()}/'" if folder.parts else "the folder itself"


def _decode_split(dataset, source: str, split: str, image_column: str | None, label_column: str | None,
                  image_size: int | None, limit: int | None) -> ImageTensors:
    import datasets

    features = dataset.features
    image_col = _pick_column(features, image_column, datasets.Image, _IMAGE_NAMES, "image", split, source)
    label_col = _pick_label_column(dataset, label_column, split, source)
    if image_col == label_col:
        raise ClcliError(f"image and label column are both '{image_col}'")
    if not isinstance(features[image_col], datasets.Image):
        raise ClcliError(f"column '{image_col}' is not an image column (feature {type(features[image_col]).__name__})")
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        raise ClcliError(f"split '{split}' of {source} has no rows")
    # Arrow format hands back the stored bytes/paths without decoding anything.
    table = dataset.select_columns([image_col, label_col]).with_format("arrow")[:n]
    labels, class_names = _labels(table.column(label_col), features[label_col], label_col, split)
    images, kept, skipped = _decode_images(_records(table.column(image_col)), n, image_size, image_col)
    if skipped:
        labels = labels[kept]
    return ImageTensors(torch.from_numpy(images), torch.from_numpy(labels), class_names, skipped)


def _labels(column, feature, name: str, split: str) -> tuple[np.ndarray, list[str]]:
    import datasets

    values = column.to_pylist()
    if isinstance(feature, datasets.ClassLabel):
        names = [str(x) for x in feature.names]
        labels = np.asarray(values, dtype=np.int64)
    elif isinstance(feature, datasets.Value) and feature.dtype == "string":
        names = sorted({v for v in values if v is not None})
        index = {v: i for i, v in enumerate(names)}
        labels = np.asarray([index.get(v, -1) for v in values], dtype=np.int64)
    elif isinstance(feature, datasets.Value) and ("int" in feature.dtype or feature.dtype == "bool"):
        labels = np.asarray([-1 if v is None else int(v) for v in values], dtype=np.int64)
        names = [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]
    else:
        raise ClcliError(f"column '{name}' is not a label column (feature {type(feature).__name__})")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        raise ClcliError(f"column '{name}' of split '{split}' has rows without a valid label "
                         f"(values {int(labels.min())}..{int(labels.max())}, {len(names)} classes)")
    return labels, names


def _records(column) -> Iterator[tuple[bytes | None, str | None]]:
    """(bytes, path) of every stored image, one arrow chunk at a time."""
    for chunk in column.chunks:
        yield from zip(chunk.field("bytes").to_pylist(), chunk.field("path").to_pylist())


class _NotUniform(Exception):
    """Raised by the fast path when images differ in size or channel count."""


class _Unreadable(Exception):
    """One stored image that cannot be decoded; `where` is its file path (or its row)."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


# What PIL raises for damaged files varies by format: OSError (truncated, unidentified), SyntaxError (broken PNG),
# ValueError / EOFError / struct.error (bad headers), DecompressionBombError (absurd sizes).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


def _decode_images(records: Iterable[tuple[bytes | None, str | None]], n: int, image_size: int | None,
                   column: str = "image") -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Decode the first `n` stored images into one uint8 array [K, C, H, W]; unreadable ones are left out.

    Returns (images, kept: the row numbers of the K images, skipped: [{"image", "reason"}] of the others).
    Fast path: the first readable image fixes channels and size, the rest are written straight into a preallocated
    array. If a later image has another size (and no image_size was given) or is colour after grayscale ones, decode
    again knowing the whole set: C = 3 if any image is colour, size = the largest side of the commonest size.
    """
    records = list(records)
    try:
        return _decode_uniform(records, n, image_size, column)
    except _NotUniform:
        pass
    channels, sizes = 1, Counter()
    for i, rec in enumerate(records[:n]):
        try:
            im = _open(rec, i, column)
        except _Unreadable:
            continue  # reported by the decoding pass below
        channels = max(channels, _channels(im))
        sizes[im.size] += 1
    if image_size is None:
        (w, h), _ = sizes.most_common(1)[0]
        image_size = max(w, h)
    return _decode_uniform(records, n, image_size, column, channels=channels)


def _decode_uniform(records, n: int, image_size: int | None, column: str,
                    channels: int | None = None) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    out = None
    kept: list[int] = []
    skipped: list[dict] = []
    for i, rec in enumerate(records[:n]):
        try:
            im = _open(rec, i, column)
            c = _channels(im)
            if out is None:
                channels = channels or c
                w, h = (image_size, image_size) if image_size else im.size
                out = np.empty((n, channels, h, w), dtype=np.uint8)
            if c > channels:
                raise _NotUniform
            if im.size != (w, h) and image_size is None:
                raise _NotUniform
            arr = _decoded_pixels(im, channels, (w, h), rec, i)
        except _Unreadable as e:
            skipped.append({"image": e.where, "reason": e.reason})
            continue
        k = len(kept)
        if channels == 1:
            out[k, 0] = arr
        else:
            out[k] = arr.transpose(2, 0, 1)
        kept.append(i)
    if out is None:
        first = skipped[0] if skipped else {"image": "-", "reason": "no rows"}
        raise ClcliError(f"none of the {n} images of column '{column}' is readable (first: {first['image']}: "
                         f"{first['reason']})")
    return out[: len(kept)], np.asarray(kept, dtype=np.int64), skipped


def _where(rec: tuple[bytes | None, str | None], i: int) -> str:
    """A stored image's file path when it is read from a file (image folders), else its row."""
    data, path = rec
    if data is None and path:
        return path
    return f"row {i}" + (f" ({path})" if path else "")


def _open(rec: tuple[bytes | None, str | None], i: int, column: str):
    data, path = rec
    if data is None and not path:
        raise _Unreadable(f"row {i}", f"column '{column}' holds no image")
    try:
        if data is None:
            with open(path, "rb") as f:
                data = f.read()
        return Image.open(io.BytesIO(data))
    except DECODE_ERRORS as e:
        raise _Unreadable(_where(rec, i), f"not a readable image ({one_line(e)})") from e


def _channels(im) -> int:
    return 1 if im.mode in _GRAY_MODES else 3


def _decoded_pixels(im, channels: int, size: tuple[int, int], rec, i: int) -> np.ndarray:
    try:
        return image_pixels(im, channels, size)
    except DECODE_ERRORS as e:  # truncated data shows up when pixels are decoded
        raise _Unreadable(_where(rec, i), f"not a readable image ({one_line(e)})") from e


def image_pixels(im, channels: int, size: tuple[int, int]) -> np.ndarray:
    """The image as uint8 [H, W] (channels 1) or [H, W, 3], resized (bilinear) to `size` = (W, H) if needed.
    Training data and `clcli predict` go through this same function, so they see the same pixels."""
    if im.mode.startswith("I;16"):  # 16-bit grayscale: keep the high byte rather than clipping at 255
        im = Image.fromarray((np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8), mode="L")
    target = "L" if channels == 1 else "RGB"
    if im.mode != target:
        im = im.convert(target)
    if im.size != size:
        im = im.resize(size, Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


# --- cache ----------------------------------------------------------------------------------------------------


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _slug(text: str, local: Path | None) -> str:
    name = local.name if local is not None else text
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")[:40] or "data"


def _read_cache(path: Path, key: str) -> ImageTensors | None:
    """The cached tensors, or None when there is no usable cache file (a corrupt one is reported and ignored)."""
    if not path.exists():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            images, labels = f.get_tensor("images"), f.get_tensor("labels")
        class_names = json.loads(meta["class_names"])
        skipped = json.loads(meta.get("skipped", "[]"))  # files cached before skipping existed had none
        ok = (isinstance(skipped, list) and meta.get("format") == _CACHE_KIND and meta.get("key") == key
              and images.dtype == torch.uint8 and images.dim() == 4 and images.shape[1] in (1, 3)
              and labels.dtype == torch.int64 and labels.dim() == 1 and labels.shape[0] == images.shape[0]
              and isinstance(class_names, list) and all(isinstance(x, str) for x in class_names)
              and (labels.numel() == 0 or (int(labels.min()) >= 0 and int(labels.max()) < len(class_names))))
        if not ok:
            raise ValueError("unexpected contents")
    except Exception as e:  # any unreadable or foreign file: decode again and overwrite it
        log.warning("ignoring unreadable data cache %s (%s); decoding again", path, one_line(e))
        return None
    return ImageTensors(images.contiguous(), labels.contiguous(), class_names, skipped)


def _write_cache(path: Path, key: str, data: ImageTensors, source: str, split: str | None) -> None:
    from safetensors.torch import save_file

    meta = {"format": _CACHE_KIND, "version": str(CACHE_FORMAT_VERSION), "key": key, "source": source,
            "split": str(split), "class_names": json.dumps(data.class_names), "skipped": json.dumps(data.skipped)}
    try:
        with atomic_path(path) as tmp:
            save_file({"images": data.images, "labels": data.labels}, str(tmp), metadata=meta)
    except OSError as e:  # a read-only or full cache must not stop training: the tensors are already decoded
        log.warning("could not write data cache %s (%s)", path, one_line(e))
