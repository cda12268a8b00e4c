"""clcli.data: decoding splits into uint8 tensors, the on-disk cache, batch augmentation, normalisation, epoch order.

Tiny synthetic datasets are written to tmp_path; expected pixels are computed by hand or with plain PIL/numpy.
Everything runs offline and writes only under tmp_path.
"""
from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image

import clcli.data as D
from clcli.data import _batch, _load
from clcli.errors import ClcliError

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """No network, and every cache (HF and clcli) under tmp_path."""
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.setenv("CLCLI_CACHE", str(tmp_path / "clcli-env"))
    # `datasets` and `huggingface_hub` read these once at import time, so patch the live values too.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def gray(value: int, size=(4, 4)) -> Image.Image:
    return Image.fromarray(np.full(size[::-1], value, np.uint8), mode="L")


def rgb(r: int, g: int, b: int, size=(4, 4)) -> Image.Image:
    return Image.fromarray(np.broadcast_to(np.array([r, g, b], np.uint8), (size[1], size[0], 3)).copy(), mode="RGB")


def write_parquet(folder: Path, splits: dict, features: datasets.Features, config: str = "default") -> Path:
    """Write {split: {column: values}} as <folder>/<config>/<split>-00000-of-00001.parquet (the Hub layout)."""
    for split, columns in splits.items():
        path = folder / config / f"{split}-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict(columns, features=features).to_parquet(str(path))
    return folder


def simple_dataset(folder: Path, values=(10, 20, 30, 40), labels=(0, 1, 1, 0)) -> Path:
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    return write_parquet(folder, {"train": {"image": [gray(v) for v in values], "label": list(labels)},
                                  "test": {"image": [gray(5)], "label": [1]}}, feats)


def load(source, split="train", tmp_path=None, **kw):
    kw.setdefault("cache_dir", str(tmp_path / "cache") if tmp_path else None)
    return D.load_image_tensors(str(source), split, **kw)


# --- loading and column detection -----------------------------------------------------------------------------


def test_image_and_label_columns_are_found_by_feature_type_whatever_their_names(tmp_path):
    feats = datasets.Features({"idx": datasets.Value("int32"), "note": datasets.Value("string"),
                               "photo": datasets.Image(), "kind": datasets.ClassLabel(names=["b", "a", "c"])})
    src = write_parquet(tmp_path / "ds", {"train": {"idx": [0, 1, 2], "note": ["x", "y", "z"],
                                                    "photo": [rgb(1, 2, 3), rgb(4, 5, 6), rgb(7, 8, 9)],
                                                    "kind": [2, 0, 1]}}, feats)
    out = load(src, tmp_path=tmp_path)
    assert out.class_names == ["b", "a", "c"]  # the ClassLabel's order, not sorted
    assert out.labels.dtype == torch.int64 and out.labels.tolist() == [2, 0, 1]
    assert out.images.dtype == torch.uint8 and out.images.shape == (3, 3, 4, 4) and out.images.is_contiguous()
    assert out.images[1, :, 0, 0].tolist() == [4, 5, 6]  # PNG is lossless: exact pixels, channels first


def test_explicit_columns_win_and_an_integer_label_column_gets_numbered_class_names(tmp_path):
    feats = datasets.Features({"a": datasets.Image(), "b": datasets.Image(), "y": datasets.Value("int64")})
    src = write_parquet(tmp_path / "ds", {"train": {"a": [gray(1), gray(2)], "b": [gray(100), gray(200)],
                                                    "y": [2, 0]}}, feats)
    out = load(src, tmp_path=tmp_path, image_column="b", label_column="y")
    assert out.images[:, 0, 0, 0].tolist() == [100, 200]
    assert out.class_names == ["0", "1", "2"] and out.labels.tolist() == [2, 0]


def test_grayscale_stays_one_channel_and_normalize_repeats_it_to_three(tmp_path):
    out = load(simple_dataset(tmp_path / "ds"), tmp_path=tmp_path)
    assert out.images.shape == (4, 1, 4, 4)
    assert out.images[:, 0, 2, 3].tolist() == [10, 20, 30, 40]
    x = D.normalize(out.images, (0.5,), (0.25,), channels=3)
    assert x.shape == (4, 3, 4, 4) and x.dtype == torch.float32 and x.is_contiguous()
    # image 0 is all 10: (10/255 - 0.5) / 0.25 in every channel
    assert torch.allclose(x[0], torch.full((3, 4, 4), (10 / 255 - 0.5) / 0.25))
    y = D.normalize(out.images, (0.1, 0.2, 0.3), (0.5, 0.5, 0.5), channels=3)  # per-output-channel stats
    assert torch.allclose(y[1, :, 0, 0], torch.tensor([(20 / 255 - m) / 0.5 for m in (0.1, 0.2, 0.3)]))


def test_normalize_rgb_uses_each_channel_stats():
    images = torch.tensor([[[[0]], [[255]], [[51]]]], dtype=torch.uint8)  # one 1x1 RGB pixel (0, 255, 51)
    x = D.normalize(images, (0.0, 0.5, 0.2), (1.0, 0.5, 0.1))
    assert torch.allclose(x.flatten(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
    with pytest.raises(ClcliError, match="positive"):
        D.normalize(images, (0.0, 0.0, 0.0), (1.0, 0.0, 1.0))


def test_rgba_cmyk_and_palette_images_become_rgb_and_mixed_sets_are_all_rgb(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 40))
    cmyk = rgb(200, 100, 50).convert("CMYK")
    palette = rgb(0, 128, 255).convert("P")
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x"])})
    # The first image is grayscale: the decoder has to notice the colour ones and redo the set as RGB.
    src = write_parquet(tmp_path / "ds", {"train": {"image": [gray(77), rgba, cmyk, palette],
                                                    "label": [0, 0, 0, 0]}}, feats)
    out = load(src, tmp_path=tmp_path)
    assert out.images.shape == (4, 3, 4, 4)
    px = out.images[:, :, 1, 1].tolist()
    assert px[0] == [77, 77, 77]
    assert px[1] == [10, 20, 30]
    assert px[2] == list(np.asarray(cmyk.convert("RGB"))[1, 1])
    assert px[3] == list(np.asarray(palette.convert("RGB"))[1, 1])


def test_images_of_different_sizes_are_resized_bilinear_to_the_commonest_size(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (h, w), dtype=np.uint8) for h, w in [(6, 6), (3, 5), (6, 6)]]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x"])})
    src = write_parquet(tmp_path / "ds", {"train": {"image": [Image.fromarray(a) for a in arrays],
                                                    "label": [0, 0, 0]}}, feats)
    out = load(src, tmp_path=tmp_path)
    assert out.images.shape == (3, 1, 6, 6)
    assert torch.equal(out.images[0, 0], torch.from_numpy(arrays[0]))  # already 6x6: untouched
    expected = np.array(Image.fromarray(arrays[1]).resize((6, 6), Image.BILINEAR))
    assert torch.equal(out.images[1, 0], torch.from_numpy(expected))


def test_image_size_resizes_every_image(tmp_path):
    out = load(simple_dataset(tmp_path / "ds"), tmp_path=tmp_path, image_size=7)
    assert out.images.shape == (4, 1, 7, 7) and out.images[2].unique().tolist() == [30]


def test_limit_takes_the_first_rows(tmp_path):
    out = load(simple_dataset(tmp_path / "ds"), tmp_path=tmp_path, limit=3)
    assert out.images[:, 0, 0, 0].tolist() == [10, 20, 30] and out.labels.tolist() == [0, 1, 1]


def test_save_to_disk_and_image_folder_layouts_load(tmp_path):
    feats = datasets.Features({"pic": datasets.Image(), "y": datasets.ClassLabel(names=["p", "q"])})
    ds = datasets.Dataset.from_dict({"pic": [gray(3), gray(4)], "y": [1, 0]}, features=feats)
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "saved"))
    out = load(tmp_path / "saved", "test", tmp_path=tmp_path)
    assert out.class_names == ["p", "q"] and out.images[:, 0, 0, 0].tolist() == [3, 4]

    for cls, value in [("ant", 50), ("bee", 150)]:
        (tmp_path / "folder" / cls).mkdir(parents=True)
        rgb(value, value, value).save(tmp_path / "folder" / cls / "0.png")
    out = load(tmp_path / "folder", tmp_path=tmp_path)
    assert out.class_names == ["ant", "bee"] and out.images.shape == (2, 3, 4, 4)
    assert sorted(zip(out.labels.tolist(), out.images[:, 0, 0, 0].tolist())) == [(0, 50), (1, 150)]


# --- errors a user can cause ----------------------------------------------------------------------------------


def one_line_error(match: str, fn, *args, **kw) -> str:
    with pytest.raises(ClcliError, match=match) as info:
        fn(*args, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_local_folder_is_a_clear_error(tmp_path):
    one_line_error("data folder not found", load, tmp_path / "nope", tmp_path=tmp_path)


def test_dataset_without_an_image_column_is_a_clear_error(tmp_path):
    feats = datasets.Features({"x": datasets.Value("int64"), "label": datasets.ClassLabel(names=["a"])})
    src = write_parquet(tmp_path / "ds", {"train": {"x": [1], "label": [0]}}, feats)
    msg = one_line_error("no image column", load, src, tmp_path=tmp_path)
    assert "x, label" in msg  # names the columns there are


def test_dataset_without_a_label_column_is_a_clear_error(tmp_path):
    feats = datasets.Features({"image": datasets.Image(), "y": datasets.Value("int64")})
    src = write_parquet(tmp_path / "ds", {"train": {"image": [gray(1)], "y": [0]}}, feats)
    one_line_error("no label column .*--set data.label_column=NAME", load, src, tmp_path=tmp_path)


@pytest.mark.parametrize("layout,cause", [
    (["cat/0.png", "cat/1.png"], r"one class folder found \('cat'\)"),
    (["train/cat/0.png", "val/cat/0.png"], r"one class folder found \('train/cat'\)"),
    (["0.png", "1.png"], "its images lie in the folder itself, in no class folder"),
    (["0.png", "dog/0.png"], r"its images lie at different depths \(the folder itself and 'dog/'\)"),
])
def test_an_image_folder_without_two_class_folders_names_its_layout_not_a_label_column(tmp_path, layout, cause):
    """`datasets` labels an image folder's images only from two or more class folders: with one, the error names
    that folder and asks for one folder per class, whether the split is decoded or streamed."""
    from clcli.data._stream import StreamSplit

    for file in layout:
        (tmp_path / "photos" / file).parent.mkdir(parents=True, exist_ok=True)
        gray(5).save(tmp_path / "photos" / file)
    expected = cause + r".*at least two class folders, one per class"
    message = one_line_error(expected, load, tmp_path / "photos", tmp_path=tmp_path)
    assert "label column" not in message
    one_line_error(expected, StreamSplit, str(tmp_path / "photos"), "train", train=False, size=4, workers=0,
                   cache_dir=str(tmp_path / "cache"))


def test_unknown_split_names_the_available_ones(tmp_path):
    one_line_error(r"split 'validation' not found .*available: train, test",
                   load, simple_dataset(tmp_path / "ds"), "validation", tmp_path=tmp_path)


def test_unreachable_hub_id_says_to_pass_a_local_folder(tmp_path):
    one_line_error("'uoft-cs/cifar10' is not a local folder.*Hugging Face Hub.*--data FOLDER", load, "uoft-cs/cifar10",
                   tmp_path=tmp_path)


def test_bad_arguments_are_clear_errors(tmp_path):
    src = simple_dataset(tmp_path / "ds")
    one_line_error("column 'pixels' not found", load, src, tmp_path=tmp_path, image_column="pixels")
    one_line_error("limit", load, src, tmp_path=tmp_path, limit=0)
    one_line_error("unknown augment", D.BatchAugment, "mixup")


# --- cache ----------------------------------------------------------------------------------------------------


def no_decoding(*args, **kwargs):
    raise AssertionError("decoded although the cache should have been used")


def test_second_load_is_a_cache_hit_with_no_decoding(tmp_path, monkeypatch):
    src = simple_dataset(tmp_path / "ds")
    first = load(src, tmp_path=tmp_path)
    monkeypatch.setattr(_load, "_decode_images", no_decoding)
    monkeypatch.setattr(datasets, "load_dataset", no_decoding)  # a local hit does not even open the dataset
    second = load(src, tmp_path=tmp_path)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert second.class_names == ["cat", "dog"]
    assert len(list((tmp_path / "cache" / "data").glob("*.safetensors"))) == 1


def test_default_cache_dir_comes_from_clcli_cache(tmp_path):
    load(simple_dataset(tmp_path / "ds"), cache_dir=None)
    assert len(list((tmp_path / "clcli-env" / "data").glob("*.safetensors"))) == 1


def test_changed_source_or_options_decode_again(tmp_path, monkeypatch):
    src = simple_dataset(tmp_path / "ds")
    calls = []
    real = _load._decode_images
    monkeypatch.setattr(_load, "_decode_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    load(src, tmp_path=tmp_path)
    load(src, tmp_path=tmp_path)
    assert len(calls) == 1
    simple_dataset(tmp_path / "ds", values=(90, 91, 92, 93))  # rewrite the files in place
    out = load(src, tmp_path=tmp_path)
    assert len(calls) == 2 and out.images[:, 0, 0, 0].tolist() == [90, 91, 92, 93]
    load(src, tmp_path=tmp_path, limit=2)
    load(src, tmp_path=tmp_path, image_size=8)
    assert len(calls) == 4


def test_corrupt_cache_file_is_ignored_and_rewritten(tmp_path, monkeypatch):
    src = simple_dataset(tmp_path / "ds")
    first = load(src, tmp_path=tmp_path)
    (cache_file,) = (tmp_path / "cache" / "data").glob("*.safetensors")
    cache_file.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    again = load(src, tmp_path=tmp_path)
    assert torch.equal(first.images, again.images)
    monkeypatch.setattr(_load, "_decode_images", no_decoding)
    assert torch.equal(load(src, tmp_path=tmp_path).images, first.images)  # the rewritten file is a hit


# --- the shipped quickstart subset ----------------------------------------------------------------------------


def test_quickstart_subset_is_real_balanced_cifar10_and_small(tmp_path):
    files = [p for p in D.QUICKSTART_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 10 * 1024 * 1024
    assert "Krizhevsky" in (D.QUICKSTART_DIR / "README.md").read_text()
    feature = datasets.load_dataset(str(D.QUICKSTART_DIR), split="test", cache_dir=str(tmp_path / "hf2")).features
    assert isinstance(feature["label"], datasets.ClassLabel) and feature["label"].names == CIFAR_NAMES
    train = load(D.QUICKSTART_DIR, "train", tmp_path=tmp_path)
    test = load(D.QUICKSTART_DIR, "test", tmp_path=tmp_path)
    assert train.images.shape == (5000, 3, 32, 32) and test.images.shape == (1000, 3, 32, 32)
    assert train.class_names == CIFAR_NAMES
    assert torch.bincount(train.labels).tolist() == [500] * 10
    assert torch.bincount(test.labels).tolist() == [100] * 10
    assert 0.35 < train.images.float().mean() / 255 < 0.6  # real photos, not blank


# --- batch ops ------------------------------------------------------------------------------------------------


def test_channel_stats_match_a_float_computation():
    images = torch.randint(0, 256, (37, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = D.channel_stats(images)
    x = images.double() / 255
    assert np.allclose(mean, x.mean(dim=(0, 2, 3)).tolist(), atol=1e-12)
    assert np.allclose(std, x.std(dim=(0, 2, 3), unbiased=False).tolist(), atol=1e-12)
    assert D.channel_stats(torch.full((2, 1, 3, 3), 51, dtype=torch.uint8)) == ((0.2,), (0.0,))


def test_channel_stats_accumulate_exactly_across_chunks(monkeypatch):
    monkeypatch.setattr(_batch, "_STATS_CHUNK", 2 * 3 * 5 * 7)  # two images per chunk, last chunk short
    images = torch.randint(0, 256, (37, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    mean, std = D.channel_stats(images)
    x = images.double() / 255
    assert np.allclose(mean, x.mean(dim=(0, 2, 3)).tolist(), atol=1e-12)
    assert np.allclose(std, x.std(dim=(0, 2, 3), unbiased=False).tolist(), atol=1e-12)


def reference_crop_flip(images: torch.Tensor, rows, cols, flips, pad: int) -> torch.Tensor:
    """By hand, one image at a time: zero-pad, slice the HxW window at (row, col), mirror if asked."""
    b, c, h, w = images.shape
    out = torch.empty_like(images)
    for i in range(b):
        padded = torch.zeros(c, h + 2 * pad, w + 2 * pad, dtype=images.dtype)
        padded[:, pad:pad + h, pad:pad + w] = images[i]
        window = padded[:, rows[i]:rows[i] + h, cols[i]:cols[i] + w]
        out[i] = window.flip(-1) if flips[i] else window
    return out


def batch(b=64, c=3, h=6, w=5, seed=0) -> torch.Tensor:
    # Values 1..255 (never 0), so padding is distinguishable from image content.
    return torch.randint(1, 256, (b, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_crop_flip_at_known_offsets_matches_a_hand_made_reference():
    images = batch(b=4)
    rows, cols, flips = [0, 8, 4, 2], [8, 0, 4, 5], [False, True, False, True]
    got = _batch._crop_flip(images, torch.tensor(rows), torch.tensor(cols), torch.tensor(flips), 4)
    assert torch.equal(got, reference_crop_flip(images, rows, cols, flips, 4))
    assert torch.equal(got[2], images[2])  # offset (4, 4) with padding 4 and no flip is the identity
    # Offset (0, 8): shifted down 4 and left 4, so the top 4 rows and the right 4 columns are padding zeros.
    assert got[0, :, :4].eq(0).all() and got[0, :, :, -4:].eq(0).all()
    assert torch.equal(got[0, :, 4:, :1], images[0, :, :2, 4:])


def test_crop_flip_draws_each_sample_from_the_generator_and_shifts_and_flips():
    images = batch()
    aug = D.BatchAugment("crop_flip", padding=2)
    out = aug(images, torch.Generator().manual_seed(3))
    assert out.dtype == torch.uint8 and out.shape == images.shape
    seen = set()
    for i in range(len(images)):  # every output is exactly one of the 5 * 5 * 2 possible crops
        matches = [(r, c, f) for r in range(5) for c in range(5) for f in (False, True)
                   if torch.equal(out[i], reference_crop_flip(images[i:i + 1], [r], [c], [f], 2)[0])]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len({(r, c) for r, c, _ in seen}) > 10 and {f for *_, f in seen} == {False, True}


def test_batch_augment_is_reproducible_from_the_generator_seed():
    images = batch()
    for kind in ("flip", "crop_flip"):
        aug = D.BatchAugment(kind)
        a = aug(images, torch.Generator().manual_seed(7))
        b = aug(images, torch.Generator().manual_seed(7))
        c = aug(images, torch.Generator().manual_seed(8))
        assert torch.equal(a, b) and not torch.equal(a, c)
    assert D.BatchAugment("none")(images, torch.Generator()) is images


def test_flip_mirrors_about_half_the_batch_and_leaves_the_rest():
    images = batch(b=200)
    out = D.BatchAugment("flip")(images, torch.Generator().manual_seed(0))
    same = (out == images).flatten(1).all(1)
    mirrored = (out == images.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 60 < int(mirrored.sum()) < 140


def test_epoch_batches_depend_only_on_seed_and_epoch():
    a = D.epoch_batches(103, 10, seed=5, epoch=2)
    torch.manual_seed(1234)  # global RNG state must not matter
    torch.rand(10)
    b = D.epoch_batches(103, 10, seed=5, epoch=2)
    assert len(a) == 10 and all(len(x) == 10 and x.dtype == torch.int64 for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(torch.cat(a), torch.cat(D.epoch_batches(103, 10, seed=5, epoch=3)))
    assert not torch.equal(torch.cat(a), torch.cat(D.epoch_batches(103, 10, seed=6, epoch=2)))
    full = D.epoch_batches(103, 10, seed=5, epoch=2, drop_last=False)
    assert len(full) == 11 and sorted(torch.cat(full).tolist()) == list(range(103))
    assert torch.equal(torch.cat(D.epoch_batches(7, 3, seed=0, epoch=0, shuffle=False, drop_last=False)),
                       torch.arange(7))
    one_line_error("larger than", D.epoch_batches, 5, 8, seed=0, epoch=0)


# --- unreadable images and single-split folders ---------------------------------------------------------------


def test_unreadable_images_in_an_image_folder_are_skipped_listed_and_cached(tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    for cls, values in [("ant", (10, 20)), ("bee", (30, 40))]:
        (folder / cls).mkdir(parents=True)
        for i, v in enumerate(values):
            rgb(v, v, v, size=(6, 6)).save(folder / cls / f"{i}.png")
    good = (folder / "ant" / "0.png").read_bytes()
    (folder / "ant" / "1a_truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "bee" / "0a_garbage.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = load(folder, tmp_path=tmp_path)
    assert sorted(Path(s["image"]).name for s in out.skipped) == ["0a_garbage.jpg", "1a_truncated.png"]
    assert all(Path(s["image"]).is_absolute() and "readable" in s["reason"] for s in out.skipped)
    # the labels stay with their images
    assert sorted(zip(out.labels.tolist(), out.images[:, 0, 0, 0].tolist())) == [(0, 10), (0, 20), (1, 30), (1, 40)]
    monkeypatch.setattr(_load, "_decode_images", no_decoding)
    cached = load(folder, tmp_path=tmp_path)
    assert cached.skipped == out.skipped and torch.equal(cached.images, out.images)


def test_unreadable_rows_of_a_parquet_split_are_skipped_by_row_and_all_unreadable_is_an_error(tmp_path):
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    rows = [{"bytes": b"garbage", "path": None}, gray(7), {"bytes": b"junk", "path": "x.png"}, gray(9)]
    src = write_parquet(tmp_path / "ds", {"train": {"image": rows, "label": [0, 1, 0, 1]}}, feats)
    out = load(src, tmp_path=tmp_path)
    assert [s["image"] for s in out.skipped] == ["row 0", "row 2 (x.png)"]
    assert out.images[:, 0, 0, 0].tolist() == [7, 9] and out.labels.tolist() == [1, 1]
    bad = write_parquet(tmp_path / "bad", {"train": {"image": [{"bytes": b"junk", "path": None}], "label": [0]}},
                        feats)
    one_line_error("none of the 1 images .* is readable", load, bad, tmp_path=tmp_path)


def test_split_none_takes_the_only_split_and_refuses_several(tmp_path):
    for cls in ("x", "y"):
        (tmp_path / "folder" / cls).mkdir(parents=True)
        gray(5).save(tmp_path / "folder" / cls / "0.png")
    assert load(tmp_path / "folder", None, tmp_path=tmp_path).class_names == ["x", "y"]
    one_line_error("several splits", load, simple_dataset(tmp_path / "ds"), None, tmp_path=tmp_path)
    with pytest.raises(_load.SplitNotFound) as info:
        load(simple_dataset(tmp_path / "ds"), "validation", tmp_path=tmp_path)
    assert info.value.available == ["train", "test"]
