import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import clcli
from clcli import export
from clcli.cli import app
from clcli.errors import ClcliError
from clcli.run import Run
from clcli.train import train

from _helpers import tiny_recipe

runner = CliRunner()


@pytest.fixture(scope="module")
def cl_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "cl"
    train(tiny_recipe(epochs=1), out, show_progress=False)
    return out


def _exact_round_trip(run_dir, out_dir, size=32):
    export.export_run(run_dir, out_dir, measure=False)
    run = Run.open(run_dir)
    plan, cohort = run.plan, run.cohort()
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    for name, net in zip(cohort.labels, cohort.networks):
        loaded = clcli.load(out_dir / f"{name}.safetensors")
        assert torch.equal(loaded(x), net(x)), name  # bit for bit, without the run folder or the other networks
    return plan


def test_split_export_reproduces_each_network_exactly(cl_run, tmp_path):
    _exact_round_trip(cl_run, tmp_path / "exp")
    index = json.loads((tmp_path / "exp" / "manifest.json").read_text())
    assert [e["model"] for e in index["networks"]] == ["test_resnet", "test_efficientnet"]


def test_each_file_holds_only_its_network_and_its_mkb_half(cl_run, tmp_path):
    import timm
    from safetensors import safe_open

    export.export_run(cl_run, tmp_path, measure=False)
    for name in ("test_resnet", "test_efficientnet"):
        with safe_open(str(tmp_path / f"{name}.safetensors"), "pt") as f:
            keys = set(f.keys())
            meta = json.loads(f.metadata()["clcli"])
        timm_keys = set(timm.create_model(name, num_classes=10).state_dict())
        assert timm_keys <= keys
        extra = keys - timm_keys
        assert extra and all(k.startswith("mkb.site0.") for k in extra)
        assert any(".transfer." in k for k in extra) and any(".encoder." in k for k in extra)
        assert meta["model"] == name and meta["format_version"] == export.SPLIT_FORMAT_VERSION
        assert meta["class_names"][0] == "airplane" and meta["stem"]["conv"]
        for field in ("kwargs", "input_size", "mean", "std", "mkb_halves", "recipe", "versions", "test_acc"):
            assert field in meta


@pytest.mark.parametrize(
    "models, size, stem, site, layout",
    [
        (["test_mambaout", "test_resnet"], 64, "imagenet", "8x8", "NHWC"),  # mambaout's stages.1 (planned: stages.0)
        (["test_vit", "test_resnet"], 64, "imagenet", "4x4", "NLC"),
    ],
)
def test_round_trip_for_nhwc_and_token_grid_taps(tmp_path, models, size, stem, site, layout):
    recipe = tiny_recipe(models=models, epochs=1)
    recipe.input_size, recipe.stem = size, stem
    recipe.cl.sites = [site]
    recipe.data.image_size = size
    recipe.data.train_limit, recipe.data.test_limit = 64, 32
    train(recipe, tmp_path / "run", show_progress=False)
    plan = _exact_round_trip(tmp_path / "run", tmp_path / "exp", size)
    assert layout in {t.layout for t in plan.sites[0].taps}


def test_three_networks_and_two_sites_round_trip(tmp_path):
    recipe = tiny_recipe(models=["test_resnet", "test_efficientnet", "test_convnext"], epochs=1, mkbs=2)
    recipe.data.train_limit, recipe.data.test_limit = 64, 32
    train(recipe, tmp_path / "run", show_progress=False)
    plan = _exact_round_trip(tmp_path / "run", tmp_path / "exp")
    assert len(plan.sites) == 2 and len(plan.models) == 3


def test_the_same_model_twice_is_two_networks_everywhere(tmp_path):
    recipe = tiny_recipe(models=["test_resnet", "test_resnet"], epochs=1)
    recipe.data.train_limit, recipe.data.test_limit = 64, 32
    recipe.train.network_lr = {"test_resnet-2": 0.01}
    train(recipe, tmp_path / "run", show_progress=False)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["models"] == ["test_resnet", "test_resnet"] and list(info["test_acc"]) == ["test_resnet-1",
                                                                                         "test_resnet-2"]
    _exact_round_trip(tmp_path / "run", tmp_path / "exp")
    index = export.export_run(tmp_path / "run", tmp_path / "measured", measure=True)
    assert [(e["network"], e["model"], e["file"]) for e in index["networks"]] == [
        ("test_resnet-1", "test_resnet", "test_resnet-1.safetensors"),
        ("test_resnet-2", "test_resnet", "test_resnet-2.safetensors")]
    for e in index["networks"]:
        assert e["test_acc"] == pytest.approx(info["test_acc"][e["network"]], abs=1e-9)
    recipe.train.network_lr = {"test_resnet": 0.01}  # ambiguous: which of the two?
    with pytest.raises(ClcliError, match="not a network of this cohort"):
        train(recipe, tmp_path / "run2", show_progress=False)


def test_eval_reproduces_the_accuracy_the_run_reported(cl_run, tmp_path):
    export.export_run(cl_run, tmp_path, measure=True)
    info = json.loads((cl_run / "run.json").read_text())
    for name in ("test_resnet", "test_efficientnet"):
        result = runner.invoke(app, ["eval", str(tmp_path / f"{name}.safetensors"), "--json"])
        assert result.exit_code == 0, result.output
        acc = json.loads(result.stdout)["top1"]
        assert acc == pytest.approx(info["test_acc"][name], abs=1e-9)


def test_eval_matches_classes_by_name_not_by_folder_order(cl_run, tmp_path, monkeypatch):
    import clcli.evaluation
    from PIL import Image

    from clcli.data import QUICKSTART_DIR, load_image_tensors

    export.export_run(cl_run, tmp_path / "exp", measure=False)
    path = tmp_path / "exp" / "test_resnet.safetensors"
    test = load_image_tensors(str(QUICKSTART_DIR), "test", limit=200)

    def save(split, name, row):
        folder = tmp_path / "folder" / split / name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(test.images[row].permute(1, 2, 0).numpy()).save(folder / f"{row}.png")

    # an image folder numbers these cat 0, truck 1; the export was trained with CIFAR's cat 3, truck 9
    for name in ("truck", "cat"):
        for row in (test.labels == test.class_names.index(name)).nonzero().flatten()[:3].tolist():
            save("train", name, row)
            save("test", name, row)
    seen = {}
    real_evaluate = clcli.evaluation.evaluate

    def spy(net, images, labels, *args, **kwargs):
        seen["labels"] = sorted(labels.tolist())
        return real_evaluate(net, images, labels, *args, **kwargs)

    monkeypatch.setattr(clcli.evaluation, "evaluate", spy)
    result = export.evaluate_export(path, data=str(tmp_path / "folder"))
    assert result["images"] == 6 and seen["labels"] == [3, 3, 3, 9, 9, 9]
    assert result["evaluation"] == f"split 'test' of {tmp_path / 'folder'}"
    flat = tmp_path / "folder" / "test"  # one split only: all of it is evaluated
    assert export.evaluate_export(path, data=str(flat))["images"] == 6
    save("test", "unicorn", 0)
    with pytest.raises(ClcliError, match="not trained on: unicorn"):
        export.evaluate_export(path, data=str(tmp_path / "folder"))


def test_plain_export_is_loadable_by_timm_alone(cl_run, tmp_path):
    import timm
    from safetensors.torch import load_file

    index = export.export_run(cl_run, tmp_path, plain=True, measure=True)
    entry = index["networks"][0]
    model = timm.create_model("test_resnet", num_classes=10)
    model.load_state_dict(load_file(str(tmp_path / entry["plain_file"])))  # strict: timm's keys exactly
    assert 0.0 <= entry["plain_test_acc"] <= 100.0


def test_hub_folder_has_config_weights_and_card(cl_run, tmp_path):
    export.export_run(cl_run, tmp_path, hub_folder=True, measure=False)
    folder = tmp_path / "test_resnet-hub"
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["label_names"][0] == "airplane"
    assert "Collaborative Learning" in (folder / "README.md").read_text()
    clcli.load(folder / "model.safetensors")


def test_existing_export_is_not_overwritten_without_force(cl_run, tmp_path):
    export.export_run(cl_run, tmp_path, measure=False)
    with pytest.raises(ClcliError, match="already exists"):
        export.export_run(cl_run, tmp_path, measure=False)
    export.export_run(cl_run, tmp_path, measure=False, force=True)


def test_a_clash_with_any_target_writes_nothing(cl_run, tmp_path):
    mine = tmp_path / "test_efficientnet-hub"
    mine.mkdir()
    with pytest.raises(ClcliError, match="test_efficientnet-hub already exists"):
        export.export_run(cl_run, tmp_path, hub_folder=True, measure=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test_efficientnet-hub"]


def test_the_folder_manifest_keeps_earlier_exports_of_other_networks(cl_run, tmp_path):
    (tmp_path / "other.safetensors").write_bytes(b"an earlier export")
    earlier = {"model": "other", "file": "other.safetensors", "run": "runs/earlier", "method": "cl"}
    gone = {"model": "gone", "file": "gone.safetensors", "run": "runs/earlier", "method": "cl"}
    (tmp_path / "manifest.json").write_text(json.dumps({"networks": [earlier, gone]}))
    result = export.export_run(cl_run, tmp_path, measure=False)
    assert [e["model"] for e in result["networks"]] == ["test_resnet", "test_efficientnet"]
    index = json.loads((tmp_path / "manifest.json").read_text())
    assert [e["model"] for e in index["networks"]] == ["other", "test_resnet", "test_efficientnet"]
    assert index["networks"][1]["run"] == str(cl_run)
    (tmp_path / "manifest.json").write_text("{not json")
    before = (tmp_path / "test_resnet.safetensors").read_bytes()
    (tmp_path / "test_resnet.safetensors").write_bytes(b"x")
    with pytest.raises(ClcliError, match="export manifest .* not valid JSON .*move it away"):
        export.export_run(cl_run, tmp_path, measure=False, force=True)
    assert (tmp_path / "test_resnet.safetensors").read_bytes() == b"x" and before  # refused before writing


def test_damaged_and_foreign_files_are_one_line_errors(cl_run, tmp_path):
    export.export_run(cl_run, tmp_path, measure=False)
    good = (tmp_path / "test_resnet.safetensors").read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good[: len(good) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    future = tmp_path / "future.safetensors"
    meta = export.read_manifest(tmp_path / "test_resnet.safetensors")
    meta["format_version"] = 99
    save_file({"w": torch.zeros(2)}, str(future), metadata={"clcli": json.dumps(meta)})
    for path, message in [(truncated, "damaged|not a readable"), (garbage, "not a readable"),
                          (foreign, "not a clcli export"), (future, "format version 99"),
                          (tmp_path / "missing.safetensors", "no such file")]:
        with pytest.raises(ClcliError, match=message):
            clcli.load(path)
        result = runner.invoke(app, ["eval", str(path)])
        assert isinstance(result.exception, ClcliError)


def test_a_file_too_large_for_the_memory_left_is_not_called_damaged(cl_run, tmp_path, monkeypatch):
    """safetensors maps the whole file; under a memory limit the map fails, and the message must say memory."""
    import safetensors
    import safetensors.torch

    export.export_run(cl_run, tmp_path, measure=False)
    path = tmp_path / "test_resnet.safetensors"

    def cannot_map(name, *args, **kwargs):
        raise RuntimeError(f"unable to mmap 1647578160 bytes from file <{name}>: Cannot allocate memory (12)")

    monkeypatch.setattr(safetensors.torch, "load_file", cannot_map)
    with pytest.raises(ClcliError, match="not enough memory to read .*test_resnet.safetensors"):
        clcli.load(path)
    monkeypatch.setattr(safetensors, "safe_open", cannot_map)
    with pytest.raises(ClcliError, match="not enough memory to read .*test_resnet.safetensors"):
        export.read_manifest(path)


def test_export_cli_defaults_to_the_newest_run(cl_run, tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(cl_run, tmp_path / "runs" / "tiny")
    result = runner.invoke(app, ["export", "--split", "--no-measure"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "exported" / "test_resnet.safetensors").is_file()


def test_exporting_an_unfinished_run_says_so(cl_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(cl_run, run)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "status": "interrupted"}))
    result = runner.invoke(app, ["export", str(run), "--split", "--out", str(tmp_path / "exp"), "--no-measure"])
    assert result.exit_code == 0, result.output
    assert "is not finished (interrupted, 1 of 1 epochs)" in result.stdout
    assert export.read_manifest(tmp_path / "exp" / "test_resnet.safetensors")["epochs_trained"] == 1


def test_logging_the_export_of_a_run_never_logged_to_mlflow_is_one_line_before_any_file(cl_run, tmp_path):
    out = tmp_path / "exp"
    result = runner.invoke(app, ["export", str(cl_run), "--out", str(out), "--no-measure", "--log"])
    assert isinstance(result.exception, ClcliError) and "not logged to MLflow" in str(result.exception)
    assert not out.exists()


def test_a_logged_export_sends_its_files_and_manifest_to_the_runs_mlflow_run(cl_run, tmp_path, monkeypatch):
    import shutil

    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("clcli")).info.run_id
    run = tmp_path / "run"
    shutil.copytree(cl_run, run)
    info = json.loads((run / "run.json").read_text())
    info["tracking"] = {"mlflow": {"run_id": run_id, "tracking_uri": uri}}  # as training with --log mlflow keeps
    (run / "run.json").write_text(json.dumps(info))
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "exp"), "--no-measure", "--log"])
    assert result.exit_code == 0, result.output
    assert "logged 3 files to the run's MLflow run" in result.stdout
    logged = sorted(a.path.split("/")[-1] for a in client.list_artifacts(run_id, "exported"))
    assert logged == ["manifest.json", "test_efficientnet.safetensors", "test_resnet.safetensors"]
