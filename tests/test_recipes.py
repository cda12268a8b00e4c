import pytest
import yaml
from typer.testing import CliRunner

from clcli import recipes
from clcli.cli import app
from clcli.errors import ClcliError

runner = CliRunner()


def test_builtin_recipes_load_and_match_the_paper_settings():
    assert {"cifar10", "quickstart"} <= set(recipes.builtin_names())
    r = recipes.load("cifar10")
    assert r.models == ["resnet34", "mobilenetv2_100"]
    assert (r.train.lr, r.train.momentum, r.train.weight_decay, r.train.batch_size) == (0.1, 0.9, 1e-4, 128)
    assert (r.cl.alpha, r.cl.metric, r.data.augment, r.data.padding) == (0.2, "dot", "crop_flip", 4)
    q = recipes.load("quickstart")
    assert q.methods == ["il", "cl"] and q.data.source == "builtin:quickstart"


def test_dotted_overrides_including_list_items():
    r = recipes.load("cifar10", ["train.epochs=3", "models.0=resnet18", "cl.fuse=add", "methods=[il, cl]"])
    assert (r.train.epochs, r.models[0], r.cl.fuse, r.methods) == (3, "resnet18", "add", ["il", "cl"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("trian: {epochs: 3}\n", "unknown key 'trian'"),
        ("train: {epochz: 3}\n", "unknown key 'train.epochz'"),
        ("train: {epochs: three}\n", "'train.epochs' must be int"),
        ("train: {lr: -1}\n", "'train.lr' must be between"),
        ("cl: {metric: euclid}\n", "'cl.metric' must be one of"),
        ("models: resnet18\n", "'models' must be a list"),
        ("train: [1, 2]\n", "'train.' must be a mapping"),
        ("a: [unclosed\n", "not valid YAML"),
        ("- just\n- a list\n", "must be a mapping"),
    ],
)
def test_bad_recipes_are_one_line_errors_naming_key_and_file(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ClcliError) as info:
        recipes.load(str(path))
    assert message in str(info.value) and str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_safe_loading_refuses_python_objects(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ClcliError, match="not valid YAML"):
        recipes.load(str(path))


def test_recipes_command_lists_and_shows_resolved_yaml():
    result = runner.invoke(app, ["recipes"])
    assert result.exit_code == 0 and "quickstart" in result.stdout and "cifar10" in result.stdout
    result = runner.invoke(app, ["recipes", "show", "cifar10", "--set", "train.epochs=7"])
    assert result.exit_code == 0
    assert yaml.safe_load(result.stdout)["train"]["epochs"] == 7


def test_a_shown_recipe_copied_to_a_file_is_named_after_that_file(tmp_path):
    result = runner.invoke(app, ["recipes", "show", "cifar10"])
    assert result.exit_code == 0 and "name:" not in result.stdout
    copy = tmp_path / "my.yaml"
    copy.write_text(result.stdout)
    assert recipes.load(str(copy)).name == "my"
    assert recipes.load(str(copy)).to_dict() == dict(recipes.load("cifar10").to_dict(), name="my")


def test_a_folder_named_like_a_built_in_recipe_does_not_hide_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").mkdir()  # e.g. `clcli train --out quickstart`, then `--recipe quickstart` again
    assert recipes.load("quickstart").data.source == "builtin:quickstart"
    with pytest.raises(ClcliError, match="is a folder, not a file"):
        recipes.find(str(tmp_path / "quickstart"))
    with pytest.raises(ClcliError, match="recipe file not found"):
        recipes.find("missing.yaml")
