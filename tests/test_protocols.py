"""The paper's dataset protocols (section IV-A) on tiny synthetic data: the STL-10 fold protocol, ImageNet streaming
with top-5, and each built-in recipe's pre-processing (MNIST [0, 1], CIFAR-100 augment switch, STL-10 96 -> 32,
ImageNet train/test transforms). Everything is written under tmp_path; nothing is downloaded."""
import json
import statistics
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clcli import recipes
from clcli import train as train_lib
from clcli.cli import app
from clcli.data import QUICKSTART_DIR, BatchAugment, channel_stats
from clcli.data._stream import StreamSplit
from clcli.errors import ClcliError
from clcli.data import to_input

runner = CliRunner()
TINY = ["test_resnet", "test_efficientnet"]
N_CLASSES, N_TRAIN, N_TEST, FOLD_SIZE = 4, 40, 12, 8


def _image(rng, size, mode="RGB"):
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def write_parquet(folder: Path, splits: dict, names: list[str], config: str = "default"):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    for split, (images, labels) in splits.items():
        path = folder / config / f"{split}-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(str(path))
    return folder


@pytest.fixture(scope="module")
def stl_like(tmp_path_factory):
    """A fake STL-10: 96x96 RGB, 40 training and 12 test images, 10 overlapping folds of 8 training rows in a
    fold_indices.txt beside the parquet files (the release's format: one fold per line, 0-based, spaces)."""
    root = tmp_path_factory.mktemp("stl") / "stl10"
    rng = np.random.default_rng(0)
    labels = [i % N_CLASSES for i in range(N_TRAIN)]
    write_parquet(root, {"train": ([_image(rng, 96) for _ in range(N_TRAIN)], labels),
                         "test": ([_image(rng, 96) for _ in range(N_TEST)], [i % N_CLASSES for i in range(N_TEST)])},
                  [f"c{i}" for i in range(N_CLASSES)])
    folds = [sorted(rng.choice(N_TRAIN, FOLD_SIZE, replace=False).tolist()) for _ in range(10)]
    (root / "fold_indices.txt").write_text("".join(" ".join(map(str, f)) + " \n" for f in folds))
    return root, folds


def stl_recipe(root, *sets):
    return recipes.load("stl10", [f"data.source={root}", f"models=[{', '.join(TINY)}]", "train.epochs=1",
                                  "train.batch_size=8", "train.threads=1", *sets])


# --- STL-10: folds --------------------------------------------------------------------------------------------


def test_stl10_recipe_is_the_papers_setting():
    r = recipes.load("stl10")
    assert (r.data.folds, r.data.fold, r.data.image_size, r.input_size) == ("fold_indices.txt", None, 32, 32)
    assert (r.train.lr, r.train.schedule, r.train.batch_size, r.train.epochs) == (0.1, "plateau", 128, 200)
    assert r.data.source == "tanganke/stl10" and r.data.normalize == "dataset"


def test_one_fold_trains_on_its_rows_downsampled_96_to_32_with_the_folds_stats(stl_like, tmp_path):
    root, folds = stl_like
    data = train_lib.load_data(stl_recipe(root, "data.fold=3"), torch.device("cpu"))
    rows = folds[3]
    full = datasets.load_dataset(str(root), split="train", cache_dir=str(tmp_path / "hf"))
    expected = np.stack([np.asarray(full[i]["image"].convert("RGB").resize((32, 32), Image.BILINEAR))
                         for i in rows]).transpose(0, 3, 1, 2)
    assert data.train_images.shape == (FOLD_SIZE, 3, 32, 32)
    assert torch.equal(data.train_images, torch.from_numpy(expected))                      # 96 -> 32, bilinear
    assert data.train_labels.tolist() == [full[i]["label"] for i in rows]
    assert data.test_images.shape == (N_TEST, 3, 32, 32)                                   # the whole test split
    assert (data.mean, data.std) == channel_stats(torch.from_numpy(expected))              # this fold's stats only
    other = train_lib.load_data(stl_recipe(root, "data.fold=4"), torch.device("cpu"))
    assert other.mean != data.mean


def test_fold_errors_are_one_line(stl_like, tmp_path):
    root, _ = stl_like
    with pytest.raises(ClcliError, match="has 10 folds"):
        train_lib.load_data(stl_recipe(root, "data.fold=10"), torch.device("cpu"))
    with pytest.raises(ClcliError, match="fold-indices file 'nope.txt' not found"):
        train_lib.load_data(stl_recipe(root, "data.fold=0", "data.folds=nope.txt"), torch.device("cpu"))
    with pytest.raises(ClcliError, match="'data.fold' needs 'data.folds'"):
        recipes.load("cifar10", ["data.fold=1"])
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2 x\n")
    with pytest.raises(ClcliError, match="line 1: 'x' is not a row index"):
        train_lib.load_data(stl_recipe(root, "data.fold=0", f"data.folds={bad}"), torch.device("cpu"))
    big = tmp_path / "big.txt"
    big.write_text("1 2 400\n")
    with pytest.raises(ClcliError, match="names row 400 but the training split has 40 rows"):
        train_lib.load_data(stl_recipe(root, "data.fold=0", f"data.folds={big}"), torch.device("cpu"))


def test_train_runs_every_fold_and_reports_mean_and_std_then_resumes_a_lost_fold(stl_like, tmp_path):
    root, _ = stl_like
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", "--recipe", "stl10", "--data", str(root), "--models", *TINY,
                                 "--epochs", "1", "--out", str(out), "--no-progress", "--set", "train.batch_size=8",
                                 "--set", "train.threads=1"])
    assert result.exit_code == 0, result.output
    assert "mean ± std over 10 folds" in result.output and "folds.json" in result.output
    summary = json.loads((out / "folds.json").read_text())
    assert summary["status"] == "finished" and summary["finished_folds"] == list(range(10))
    cl = summary["results"]["cl"]
    for net in TINY:
        per_fold = [json.loads((out / f"fold{k}" / "run.json").read_text())["test_acc"][net] for k in range(10)]
        assert cl["test_acc_folds"][net] == per_fold
        assert cl["test_acc"][net] == pytest.approx(statistics.mean(per_fold), abs=1e-4)
        assert cl["test_acc_std"][net] == pytest.approx(statistics.stdev(per_fold), abs=1e-4)
        assert f"{cl['test_acc'][net]:.2f} ± {cl['test_acc_std'][net]:.2f}" in result.output
    for k in (0, 9):
        assert recipes.from_dict(__import__("yaml").safe_load((out / f"fold{k}" / "recipe.yaml").read_text())
                                 ).data.fold == k
    # a fold lost (or never reached) is trained on --resume, and the summary is written again
    import shutil

    shutil.rmtree(out / "fold9")
    result = runner.invoke(app, ["train", "--resume", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (out / "fold9" / "run.json").is_file()
    again = json.loads((out / "folds.json").read_text())
    assert again["status"] == "finished" and again["results"]["cl"]["test_acc_folds"][TINY[0]][:9] == \
        cl["test_acc_folds"][TINY[0]][:9]


# --- ImageNet: streaming, transforms, top-5 -------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """train/ and val/ class_name/*.jpg: 10 CIFAR classes from the shipped subset, 3 + 2 JPEGs each."""
    root = tmp_path_factory.mktemp("imnet") / "imagenet"
    ds = datasets.load_dataset(str(QUICKSTART_DIR), split="train", cache_dir=str(root.parent / "hf"))
    names = ds.features["label"].names
    counts: dict[tuple[str, int], int] = {}
    for row in ds.select(range(200)):
        c = row["label"]
        for split, want in (("train", 3), ("val", 2)):
            k = counts.get((split, c), 0)
            if k < want:
                path = root / split / names[c] / f"{k}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                row["img"].save(path, quality=90)
                counts[(split, c)] = k + 1
                break
    assert sum(v for (s, _), v in counts.items() if s == "train") == 30
    return root


def test_imagenet_recipe_is_the_papers_setting_and_hub_failure_is_one_line(monkeypatch):
    r = recipes.load("imagenet")
    assert (r.input_size, r.data.test_resize, r.data.augment, r.data.stream) == (224, 256, "rrc_flip", True)
    assert (r.train.batch_size, r.train.lr, r.train.schedule, r.data.source) == (256, 0.1, "plateau",
                                                                                "ILSVRC/imagenet-1k")
    with pytest.raises(ClcliError, match="pass a local folder with --data") as info:
        train_lib.load_data(r, torch.device("cpu"))
    assert "\n" not in str(info.value)
    with pytest.raises(ClcliError, match="needs 'data.stream: true'"):
        recipes.load("imagenet", ["data.stream=false"])


def test_stream_test_transform_is_resize_then_center_crop(tmp_path):
    rng = np.random.default_rng(1)
    im = _image(rng, 40).resize((40, 30))
    write_parquet(tmp_path / "ds", {"test": ([im], [0])}, ["a"])
    split = StreamSplit(str(tmp_path / "ds"), "test", train=False, size=16, test_resize=20, workers=0,
                        cache_dir=str(tmp_path / "c"))
    (images, labels), = list(split.batches(8))
    # shorter side 30 -> 20 (40 -> 26), then the central 16x16
    ref = np.asarray(im.resize((26, 20), Image.BILINEAR))[2:18, 5:21].transpose(2, 0, 1).copy()
    assert images.dtype == torch.uint8 and torch.equal(images[0], torch.from_numpy(ref)) and labels.tolist() == [0]


def test_stream_train_transform_is_a_seeded_random_resized_crop_and_flip(image_folder):
    split = StreamSplit(str(image_folder), "train", train=True, size=24, augment="rrc_flip", workers=1)
    assert len(split) == 30 and split.class_names[0] == "airplane"
    order = list(torch.arange(30).split(10))
    a = torch.cat([images for images, _ in split.epoch_feed(order, seed=0, epoch=0)])
    b = torch.cat([images for images, _ in split.epoch_feed(order, seed=0, epoch=0)])
    c = torch.cat([images for images, _ in split.epoch_feed(order, seed=0, epoch=1)])
    assert a.shape == (30, 3, 24, 24) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)                     # one seed, one augmentation per epoch
    plain = torch.cat([x for x, _ in StreamSplit(str(image_folder), "train", train=False, size=24,
                                                 workers=0).batches(30)])
    assert not torch.equal(a, plain)                                        # cropped and flipped, not just resized


def test_streamed_workers_persist_and_follow_the_machine(image_folder, monkeypatch):
    """One DataLoader per split and kind, its workers kept from epoch to epoch (persistent_workers), each image's
    crop drawn from its own seed: an epoch is the same with 1 or 2 workers and after other epochs (as resumed);
    the default worker count follows the CPUs, shared by a machine's torchrun processes."""
    from clcli.data._stream import default_workers

    order = list(torch.arange(30).split(10))

    def feed(split, epoch):
        return torch.cat([images for images, _ in split.epoch_feed(order, seed=0, epoch=epoch)])

    one = StreamSplit(str(image_folder), "train", train=True, size=24, augment="rrc_flip", workers=1)
    two = StreamSplit(str(image_folder), "train", train=True, size=24, augment="rrc_flip", workers=2)
    first = feed(one, 0)
    loader = one._loaders["train"][1]
    assert loader.persistent_workers and loader._iterator is not None  # its workers wait for the next epoch
    second = feed(one, 1)
    assert one._loaders["train"][1] is loader and loader._iterator is not None
    assert torch.equal(second, feed(two, 1)) and torch.equal(first, feed(two, 0))
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert default_workers() == 15  # a 16-core GPU host (was capped at 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_workers() == 3


def test_imagenet_recipe_streams_an_image_folder_end_to_end_with_top5(image_folder, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--recipe", "imagenet", "--data", str(image_folder), "--models", *TINY,
                                 "--epochs", "1", "--out", str(out), "--no-progress", "--set", "input_size=32",
                                 "--set", "data.test_resize=36", "--set", "train.batch_size=10", "--set",
                                 "data.workers=1", "--set", "train.threads=1", "--set", "train.channels_last=false"])
    assert result.exit_code == 0, result.output
    epochs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"epoch"' in ln]
    record = [e for e in epochs if e["type"] == "epoch"][-1]
    assert set(record["test_top5"]) == set(TINY)
    for net in TINY:
        assert 0 <= record["test_acc"][net] <= record["test_top5"][net] <= 100
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["test_top5"] == pytest.approx(record["test_top5"], abs=1e-3)
    assert "top-5" in result.output


# --- the other recipes' pre-processing ------------------------------------------------------------------------


def test_mnist_recipe_scales_pixels_to_0_1_with_no_augmentation(tmp_path):
    rng = np.random.default_rng(2)
    write_parquet(tmp_path / "mnist", {"train": ([_image(rng, 28, "L") for _ in range(4)], [0, 1, 2, 3]),
                                       "test": ([_image(rng, 28, "L")], [0])}, [str(d) for d in range(10)])
    r = recipes.load("mnist", [f"data.source={tmp_path / 'mnist'}"])
    data = train_lib.load_data(r, torch.device("cpu"))
    assert data.train_images.shape == (4, 1, 28, 28) and (data.mean, data.std) == ((0.0,), (1.0,))
    x = to_input(data.train_images, data.mean, data.std)
    assert torch.allclose(x, (data.train_images.float() / 255).expand(4, 3, 28, 28), atol=1e-6, rtol=0)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(BatchAugment(r.data.augment, r.data.padding)(data.train_images, g), data.train_images)


def test_cifar100_recipe_has_no_augmentation_unless_switched_on():
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    r = recipes.load("cifar100")
    assert r.data.augment == "none" and r.data.label_column == "fine_label"
    assert torch.equal(BatchAugment(r.data.augment, r.data.padding)(images, torch.Generator().manual_seed(0)),
                       images)
    on = recipes.load("cifar100", ["data.augment=crop_flip"])
    assert not torch.equal(BatchAugment(on.data.augment, on.data.padding)(images, torch.Generator().manual_seed(0)),
                           images)


def test_an_unreadable_streamed_image_is_skipped_and_reported(image_folder, tmp_path):
    import shutil

    root = tmp_path / "imagenet"
    shutil.copytree(image_folder, root)
    (root / "train" / "cat" / "1.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg" * 4)
    (root / "val" / "dog" / "0.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg" * 4)
    split = StreamSplit(str(root), "train", train=True, size=16, workers=1, cache_dir=str(tmp_path / "c"))
    fed = list(split.epoch_feed(list(torch.arange(30).split(10)), seed=0, epoch=0))
    assert [tuple(images.shape) for images, _ in fed] == [(10, 3, 16, 16)] * 3  # shapes never change
    (bad_path,) = split.skipped
    assert bad_path.endswith("cat/1.jpg") and "not a readable image" in split.skipped[bad_path]
    bad = [k for k, (_, positions) in enumerate(fed) if positions is not None]
    assert len(bad) == 1
    images, positions = fed[bad[0]]
    slot = int((positions != torch.arange(10)).nonzero())
    assert torch.equal(images[slot], images[positions[slot]])  # a copy of a readable image, never a blank
    val = StreamSplit(str(root), "validation", train=False, size=16, workers=1, cache_dir=str(tmp_path / "c"))
    assert sum(len(labels) for _, labels in val.batches(8)) == len(val) - 1  # evaluation leaves it out

    out = tmp_path / "run"  # end to end: training and evaluation go on, the run lists both files
    result = runner.invoke(app, ["train", "--recipe", "imagenet", "--data", str(root), "--models", *TINY,
                                 "--epochs", "1", "--out", str(out), "--no-progress", "--set", "input_size=32",
                                 "--set", "train.batch_size=10", "--set", "data.workers=1", "--set",
                                 "train.threads=1", "--set", "train.channels_last=false", "--method", "cl"])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "run.json").read_text())
    listed = {(s["split"], s["image"].split("/")[-2] + "/" + s["image"].split("/")[-1])
              for s in info["data"]["skipped_images"]}
    assert listed == {("train", "cat/1.jpg"), ("evaluation", "dog/0.jpg")}
    assert "skipped 2 unreadable images" in result.output


def test_recipes_command_lists_stl10_and_imagenet():
    result = runner.invoke(app, ["recipes"])
    assert result.exit_code == 0 and "stl10" in result.stdout and "imagenet" in result.stdout
