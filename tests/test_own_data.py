"""Your own data and weights: an image folder built from real CIFAR-10 images (the shipped quickstart subset), a
held-out validation split, a corrupt image inside the folder, a local timm weights file, and `clcli predict` on the
export. Tiny timm models, 32x32 images, one epoch."""
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

import clcli
from clcli import models, probe, recipes
from clcli.cli import app
from clcli.data import QUICKSTART_DIR, stratified_holdout
from clcli.errors import ClcliError
from clcli.train import build_cohort, evaluate, load_data
from clcli.data import to_input

from _helpers import TINY

runner = CliRunner()
CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CLASSES = ["airplane", "frog", "ship", "truck"]
PER_CLASS = 60
TINY_SETS = ["--set", "methods=[cl]", "--set", "train.batch_size=32", "--set", "train.threads=2", "--no-progress"]


def write_image_folder(root, classes, per_class, split="train"):
    """class_name/NNN.png from the shipped CIFAR-10 subset (real photos, 32x32)."""
    table = pq.read_table(QUICKSTART_DIR / "plain_text" / f"{split}-00000-of-00001.parquet")
    counts = {c: 0 for c in classes}
    for image, label in zip(table.column("img").to_pylist(), table.column("label").to_pylist()):
        name = CIFAR_NAMES[label]
        if name in counts and counts[name] < per_class:
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.open(io.BytesIO(image["bytes"])).save(root / name / f"{counts[name]:03d}.png")
            counts[name] += 1
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Module-wide caches under tmp (the autouse per-test fixture is not active yet in module fixtures)."""
    base = tmp_path_factory.mktemp("own-data-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLCLI_CACHE", str(base / "clcli"))
        mp.setenv("HF_HOME", str(base / "hf"))
        mp.setenv("HF_DATASETS_CACHE", str(base / "hf" / "datasets"))
        yield base


@pytest.fixture(scope="module")
def photos(env, tmp_path_factory):
    root = write_image_folder(tmp_path_factory.mktemp("photos"), CLASSES, PER_CLASS)
    good = (root / "frog" / "000.png").read_bytes()
    (root / "frog" / "broken.png").write_bytes(good[: len(good) // 3])  # truncated: fails when decoded
    (root / "ship" / "notes.txt").write_text("not an image")  # the image folder loader ignores it
    return root


def held_out_recipe(photos, **data):
    recipe = recipes.load("quickstart", ["methods=[cl]", f"models=[{', '.join(TINY)}]"])
    recipe.data.source = str(photos)
    recipe.data.val_fraction = 0.25
    for key, value in data.items():
        setattr(recipe.data, key, value)
    return recipe


@pytest.fixture(scope="module")
def weights_file(photos, tmp_path_factory):
    """A timm test_resnet whose 4-class classifier is fitted (closed form, on the training part) to its random
    features: well above chance on the held-out images, unlike a freshly initialised one."""
    data = load_data(held_out_recipe(photos), torch.device("cpu"))
    torch.manual_seed(123)
    net = models.create("test_resnet", {"num_classes": len(CLASSES)}).eval()
    with torch.no_grad():
        x = to_input(data.train_images, data.mean, data.std)
        features = net.forward_head(net.forward_features(x), pre_logits=True)
        f = torch.cat([features, torch.ones(len(features), 1)], 1)
        targets = torch.nn.functional.one_hot(data.train_labels, len(CLASSES)).float()
        w = torch.linalg.solve(f.T @ f + 1e-2 * torch.eye(f.shape[1]), f.T @ targets)
        net.fc.weight.copy_(w[:-1].T)
        net.fc.bias.copy_(w[-1])
    path = tmp_path_factory.mktemp("weights") / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path, evaluate(net, data.test_images, data.test_labels, data.mean, data.std)["top1"]


@pytest.fixture(scope="module")
def trained(photos, weights_file, tmp_path_factory):
    """`clcli train` on the image folder: no validation split (held out), one corrupt image, test_resnet from a
    local weights file."""
    out = tmp_path_factory.mktemp("runs") / "own"
    result = runner.invoke(app, ["train", "--recipe", "quickstart", "--data", str(photos), "--models", *TINY,
                                 "--val-fraction", "0.25", "--weights", f"test_resnet={weights_file[0]}",
                                 "--epochs", "1", "--out", str(out), *TINY_SETS])
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported")
    result = runner.invoke(app, ["export", str(trained[0]), "--out", str(out), "--no-measure"])
    assert result.exit_code == 0, result.output
    return out


# --- data -----------------------------------------------------------------------------------------------------


def test_image_folder_trains_end_to_end_with_a_held_out_split_and_skips_the_corrupt_image(trained):
    out, output = trained
    assert "holding out 25% of each class for validation" in output
    assert "skipped 1 unreadable image" in output and "broken.png" in output
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["class_names"] == CLASSES  # from the folder names
    assert info["data"]["train_images"] == 180 and info["data"]["eval_images"] == 60  # 15 of each class held out
    (skipped,) = info["data"]["skipped_images"]
    assert skipped["image"].endswith("frog/broken.png") and "truncated" in skipped["reason"]
    assert info["input_size"] == [32, 32] and info["starting_weights"]["test_efficientnet"] == "random"
    assert info["starting_weights"]["test_resnet"].startswith("file ")
    assert set(info["test_acc"]) == set(TINY)


def test_python_alone_trains_exports_and_loads_what_the_cli_does(photos, weights_file, trained, exported,
                                                                 tmp_path):
    """`clcli train --weights ...` from Python: the same arguments give the same recipe, run and exported networks."""
    from clcli.export import export_run
    from clcli.run import Run
    from clcli.train import train

    recipe = recipes.resolve("quickstart", data=str(photos), models=TINY, val_fraction=0.25,
                             weights=[f"test_resnet={weights_file[0]}"], epochs=1,
                             overrides=["methods=[cl]", "train.batch_size=32", "train.threads=2"])
    assert recipe.to_dict() == Run.open(trained[0]).recipe.to_dict()
    train(recipe, tmp_path / "run", show_progress=False)
    run = Run.pick(tmp_path / "run")
    assert json.loads((run.path / "plan.json").read_text())["fuse"] == recipe.cl.fuse
    export_run(run.path, tmp_path / "exported", measure=False)
    for name in TINY:
        ours = clcli.load(tmp_path / "exported" / f"{name}.safetensors")
        theirs = clcli.load(exported / f"{name}.safetensors")
        assert ours.clcli_manifest["mkb_halves"] and ours.clcli_manifest["class_names"] == CLASSES
        mine, cli = ours.state_dict(), theirs.state_dict()
        assert mine.keys() == cli.keys() and all(torch.equal(mine[k], cli[k]) for k in mine), name


def test_stratified_holdout_is_per_class_seeded_and_disjoint():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 1 + [3] * 2)[torch.randperm(18, generator=torch.Generator()
                                                                                   .manual_seed(0))]
    train, held = stratified_holdout(labels, 0.2, seed=3)
    assert torch.bincount(labels[held], minlength=4).tolist() == [2, 1, 0, 1]  # a single image stays in training
    assert sorted(torch.cat([train, held]).tolist()) == list(range(18))
    again = stratified_holdout(labels, 0.2, seed=3)[1]
    assert torch.equal(held, again)
    assert any(not torch.equal(held, stratified_holdout(labels, 0.2, seed=s)[1]) for s in range(4, 10))
    with pytest.raises(ClcliError, match="too few images"):
        stratified_holdout(torch.tensor([0, 1, 2]), 0.2, seed=0)


def test_validation_folder_labels_follow_the_training_class_names(photos, tmp_path):
    val = tmp_path / "val"
    for name in ("truck", "frog"):  # a subset: the folder's own numbering would be frog=0, truck=1
        (val / name).mkdir(parents=True)
        (val / name / "a.png").write_bytes((photos / name / "001.png").read_bytes())
    data = load_data(held_out_recipe(photos, val_source=str(val)), torch.device("cpu"))
    assert data.class_names == CLASSES and data.evaluation == f"the folder {val}"
    assert sorted(data.test_labels.tolist()) == [CLASSES.index("frog"), CLASSES.index("truck")]
    assert len(data.train_labels) == 4 * PER_CLASS  # nothing held out of the training folder
    (val / "cat").mkdir()
    (val / "cat" / "a.png").write_bytes((photos / "frog" / "002.png").read_bytes())
    with pytest.raises(ClcliError, match="classes the training images lack: cat"):
        load_data(held_out_recipe(photos, val_source=str(val)), torch.device("cpu"))


def test_a_val_subfolder_is_the_evaluation_split(photos, tmp_path):
    for split, count in (("train", 3), ("val", 2)):
        for name in ("frog", "ship"):
            (tmp_path / "ds" / split / name).mkdir(parents=True)
            for i in range(count):  # training photos larger than the recipe's 32 px input
                image = Image.open(photos / name / f"{i:03d}.png")
                image = image.resize((64, 48)) if split == "train" else image
                image.save(tmp_path / "ds" / split / name / f"{i}.png")
    data = load_data(held_out_recipe(tmp_path / "ds"), torch.device("cpu"))
    assert data.evaluation == "split 'validation'" and len(data.test_labels) == 4 and len(data.train_labels) == 6
    assert data.train_images.shape[-2:] == (32, 32)  # decoded at the input size the networks are planned for
    assert any("evaluating on its 'validation' split" in note for note in data.notes)


# --- starting weights -----------------------------------------------------------------------------------------


def test_a_folder_with_one_class_folder_is_a_one_line_error_that_asks_for_one_folder_per_class(exported, tmp_path):
    """`datasets` drops the labels of an image folder with a single class folder: training on it, or evaluating an
    export on it, names that folder and the fix in one line, exit code 2 (not "no label column")."""
    from _helpers import cli

    one_class = write_image_folder(tmp_path / "frogs", ["frog"], 4)
    for args in (["train", "--data", one_class, "--models", *TINY, "--epochs", "1", "--out", tmp_path / "run",
                  "--no-progress"],
                 ["eval", exported / "test_resnet.safetensors", "--data", one_class]):
        done = cli([str(arg) for arg in args])
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "one class folder found ('frog')" in done.stderr and "at least two class folders" in done.stderr
    assert not (tmp_path / "run").exists()


def test_weights_file_loads_and_changes_the_starting_accuracy(photos, weights_file, tmp_path):
    path, fitted_acc = weights_file
    data = load_data(held_out_recipe(photos), torch.device("cpu"))
    plan = probe.plan(TINY, 32, stem="imagenet", num_classes=len(CLASSES))

    def starting_acc(weights):
        cohort = build_cohort(plan, num_classes=len(CLASSES), seed=0, with_mkb=True, weights=weights)
        net = cohort.networks[0]
        return net, evaluate(net, data.test_images, data.test_labels, data.mean, data.std)["top1"]

    loaded, with_file = starting_acc({"test_resnet": str(path)})
    _, without = starting_acc(None)
    assert with_file == pytest.approx(fitted_acc) and with_file > without + 15, (with_file, without)
    from safetensors.torch import load_file

    saved = load_file(str(path))
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())


def test_weights_file_with_another_classifier_size_keeps_the_backbone(weights_file, tmp_path):
    torch.manual_seed(0)
    fresh = models.create("test_resnet", {"num_classes": 7})
    torch.manual_seed(0)
    net = models.create("test_resnet", {"num_classes": 7}, weights_file=str(weights_file[0]))
    from safetensors.torch import load_file

    saved = load_file(str(weights_file[0]))
    assert torch.equal(net.state_dict()["conv1.0.weight"], saved["conv1.0.weight"])
    assert net.fc.weight.shape == (7, saved["fc.weight"].shape[1])  # re-sized: the fresh classifier stays
    assert torch.equal(net.fc.weight, fresh.fc.weight)


def test_bad_weights_files_are_one_line_errors(weights_file, tmp_path):
    other = tmp_path / "effnet.safetensors"
    save_file(models.create("test_efficientnet", {"num_classes": 4}).state_dict(), str(other))
    pickled = tmp_path / "model.pth"
    torch.save({"model": models.create("test_resnet", {"num_classes": 4})}, pickled)  # a whole module: pickle
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 not weights")
    for path, message in [(other, "does not hold 'test_resnet' weights"), (pickled, "cannot read weights file"),
                          (garbage, "cannot read weights file"), (tmp_path / "missing.pt", "not found")]:
        with pytest.raises(ClcliError, match=message) as info:
            models.create("test_resnet", {"num_classes": 4}, weights_file=str(path))
        assert "\n" not in str(info.value)
    result = runner.invoke(app, ["train", "--models", *TINY, "--weights", "resnet50=x.safetensors"])
    assert result.exit_code != 0 and isinstance(result.exception, ClcliError)
    assert "not one of the models" in str(result.exception)


def test_pretrained_offline_fails_in_one_line_that_names_weights(photos, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--data", str(photos), "--models", *TINY, "--pretrained", "--epochs", "1",
                                 "--out", str(out), *TINY_SETS])
    assert isinstance(result.exception, ClcliError), result.output
    message = str(result.exception)
    assert "\n" not in message and "--weights test_resnet=FILE" in message
    # the finetune recipe, sized and normalised from timm's pretrained config of test_resnet (160 px, 0.5/0.5)
    assert "input size 160 px" in result.output and "mean [0.5, 0.5, 0.5]" in result.output
    assert not out.exists()  # failed before its first checkpoint: nothing is left behind


def test_finetune_recipe_defaults_differ_from_training_from_scratch():
    finetune, scratch = recipes.load("finetune"), recipes.load("cifar10")
    assert finetune.pretrained and finetune.input_size is None and finetune.data.normalize == "pretrained"
    assert finetune.train.lr <= scratch.train.lr / 10 and finetune.train.epochs < scratch.train.epochs / 10
    with pytest.raises(ClcliError, match="pass --data"):
        load_data(finetune, torch.device("cpu"))


# --- predict --------------------------------------------------------------------------------------------------


def test_class_names_flow_from_the_folder_to_the_export_and_predict(exported, photos):
    result = runner.invoke(app, ["predict", str(exported / "test_resnet.safetensors"), str(photos / "truck"),
                                 "--top", "2", "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == PER_CLASS and lines[0]["file"].endswith("truck/000.png")
    assert all(len(r["top"]) == 2 and r["top"][0]["prob"] >= r["top"][1]["prob"] for r in lines)
    assert {t["class"] for r in lines for t in r["top"]} <= set(CLASSES)
    assert clcli.load(exported / "test_resnet.safetensors").clcli_manifest["class_names"] == CLASSES


def test_predict_applies_the_exported_preprocessing(exported, photos, tmp_path):
    from clcli.data import load_image_tensors
    from clcli.predict import load_classifier, predict

    classifier = load_classifier(exported / "test_resnet.safetensors")
    manifest = classifier.net.clcli_manifest
    big = tmp_path / "big.jpg"  # another size and format: resized to the export's 32x32 as training images are
    Image.open(photos / "ship" / "005.png").resize((48, 40)).save(big)
    files = [photos / "ship" / "004.png", big]
    got = list(predict(classifier, files, top=4))
    decoded = load_image_tensors(str(photos), "train").images  # the training pipeline's pixels
    png = decoded[2 * PER_CLASS + 4]  # after airplane and frog (its broken.png skipped): ship/004.png
    resized = torch.from_numpy(np.array(Image.open(big).convert("RGB").resize((32, 32), Image.BILINEAR)))
    expected = classifier.net(to_input(torch.stack([png, resized.permute(2, 0, 1)]), manifest["mean"],
                                       manifest["std"])).softmax(1)
    for result, probs in zip(got, expected):
        for t in result["top"]:
            assert t["prob"] == pytest.approx(probs[t["index"]].item(), abs=1e-5)


def test_predict_reports_corrupt_and_non_image_files_and_exits_1(exported, photos, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes((photos / "frog" / "broken.png").read_bytes())
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    good = [str(photos / "airplane" / "000.png"), str(photos / "frog" / "003.png")]
    args = ["predict", str(exported / "test_efficientnet.safetensors"), good[0], str(broken), str(text), good[1],
            str(tmp_path / "missing.png")]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 1
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["file"] for r in lines] == [good[0], str(broken), str(text), good[1], str(tmp_path / "missing.png")]
    assert "truncated" in lines[1]["error"] and "cannot identify image" in lines[2]["error"]
    assert lines[4]["error"] == "no such file" and "top" in lines[0] and "top" in lines[3]
    table = runner.invoke(app, args)
    assert table.exit_code == 1 and "notes.txt" in table.output and "airplane/000.png" in table.output
    ok = runner.invoke(app, ["predict", str(exported / "test_efficientnet.safetensors"), *good])
    assert ok.exit_code == 0 and any(name in ok.stdout for name in CLASSES)


def test_predict_a_plain_timm_file_needs_model(weights_file, photos):
    path = str(weights_file[0])
    result = runner.invoke(app, ["predict", path, str(photos / "ship" / "000.png"), "--json"])
    assert isinstance(result.exception, ClcliError) and "pass --model NAME" in str(result.exception)
    result = runner.invoke(app, ["predict", path, str(photos / "ship" / "000.png"), "--model", "test_resnet",
                                 "--json", "--top", "4"])
    assert result.exit_code == 0, result.output
    (line,) = [json.loads(x) for x in result.stdout.splitlines()]
    assert sorted(t["class"] for t in line["top"]) == ["0", "1", "2", "3"]  # a plain file carries no class names


def test_predict_a_plain_export_uses_the_preprocessing_and_classes_in_its_header(trained, photos, tmp_path):
    from safetensors.torch import load_file

    from clcli import export
    from clcli.predict import load_classifier, predict

    out = tmp_path / "plain"
    result = runner.invoke(app, ["export", str(trained[0]), "--out", str(out), "--plain", "--no-measure"])
    assert result.exit_code == 0, result.output
    plain = out / "test_resnet.timm.safetensors"
    classifier = load_classifier(plain, model="test_resnet")
    manifest = clcli.load(out / "test_resnet.safetensors").clcli_manifest
    assert classifier.class_names == CLASSES and classifier.description.startswith("32x32")
    image = photos / "ship" / "004.png"
    (got,) = predict(classifier, [image], top=4)
    bare = models.create("test_resnet", manifest["kwargs"], stem=export.stem_change(manifest)).eval()
    bare.load_state_dict(load_file(str(plain)))
    pixels = torch.from_numpy(np.array(Image.open(image).convert("RGB"))).permute(2, 0, 1)
    probs = bare(to_input(pixels[None], manifest["mean"], manifest["std"])).softmax(1)[0]
    for t in got["top"]:
        assert t["prob"] == pytest.approx(probs[t["index"]].item(), abs=1e-5)
    old = tmp_path / "old.timm.safetensors"  # a header without the preprocessing: refused, saying what is missing
    save_file(load_file(str(plain)), str(old), metadata={"format": "pt", "clcli_plain": json.dumps({"model": "x"})})
    with pytest.raises(ClcliError, match="lacks kwargs, stem, input_size, mean, std, class_names"):
        load_classifier(old, model="test_resnet")
