"""The pictures: `clcli probe --plot`, the curves.png every run folder gets, `clcli report`: each file is written, a
PNG of the size the figure asks for, and not blank."""
import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from clcli import plots, probe
from clcli.cli import app
from clcli.errors import ClcliError
from clcli.train import train

from _helpers import tiny_recipe

runner = CliRunner()


def assert_drawn(path, size=None):
    """A PNG of `size` pixels (when given) with a drawing on it: many colours, and well over 1% of the pixels not
    white."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        if size is not None:
            assert image.size == tuple(size)
        rgb = image.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20)
        inked = sum(count for count, colour in colours if colour != (255, 255, 255))
        assert len(colours) > 20 and inked > 0.01 * rgb.width * rgb.height
    return rgb.size


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An IL and a CL run of the same tiny recipe, in one multi-method folder."""
    out = tmp_path_factory.mktemp("runs") / "both"
    train(tiny_recipe(methods=("il", "cl"), epochs=2), out, show_progress=False)
    return out


def test_every_run_folder_gets_its_curves_when_training_ends(runs):
    for method in ("il", "cl"):
        width, height = assert_drawn(runs / method / "curves.png")
        assert width == plots.DPI * plots.WIDTH_IN and height > 2 * plots.DPI * plots.CURVES_ROW_IN  # 2 networks


def test_curves_read_each_epochs_loss_parts_and_accuracy(runs):
    cl = plots._run_series(runs / "cl")
    il = plots._run_series(runs / "il")
    assert cl["acc_epochs"] == [1, 2] and set(cl["parts"]["test_resnet"]) == {"cls", "metric", "verification"}
    assert set(il["parts"]["test_efficientnet"]) == {"cls"}
    final = json.loads((runs / "cl" / "run.json").read_text())["test_acc"]
    assert cl["acc"]["test_resnet"][-1] == pytest.approx(final["test_resnet"], abs=1e-3)


def test_report_draws_several_runs_side_by_side(runs, tmp_path):
    out = tmp_path / "both.png"
    result = runner.invoke(app, ["report", str(runs / "il"), str(runs / "cl"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "2 runs drawn" in result.output
    assert_drawn(out, (1000, plots.DPI * (plots.CURVES_TOP_IN + 2 * plots.CURVES_ROW_IN)))
    # a multi-method folder alone: its methods, into the folder itself
    result = runner.invoke(app, ["report", str(runs)])
    assert result.exit_code == 0, result.output
    assert_drawn(runs / "curves.png")


def test_report_of_a_folder_that_is_no_run_is_one_line(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert isinstance(result.exception, ClcliError) and "not a clcli run folder" in str(result.exception)


@pytest.mark.parametrize("models,stem", [(["test_resnet", "test_efficientnet", "test_vit"], "imagenet"),
                                         (["test_resnet", "test_convnext"], "small")])
def test_probe_plot_joins_the_sites_across_every_network(models, stem, tmp_path):
    size = 64 if "test_vit" in models else 32
    out = tmp_path / "probe.png"
    result = runner.invoke(app, ["probe", *models, "--input-size", str(size), "--stem", stem, "--plot", str(out)])
    assert result.exit_code == 0, result.output
    n = len(models)
    assert_drawn(out, (1000, plots.DPI * (plots.PROBE_TOP_IN + n * plots.PROBE_ROW_IN)))
    assert f"plot: {out}" in result.output.replace("\n", "")


def test_probe_plot_draws_a_plan_read_back_from_json(tmp_path):
    plan = probe.Plan.from_dict(probe.plan(["test_resnet", "test_efficientnet"], 32, mkbs=2).to_dict())
    path, size = plots.probe_png(plan, tmp_path / "p.png")
    assert_drawn(path, size)
