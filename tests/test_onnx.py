"""`clcli export --onnx`: one ONNX file per network with its MKB half inside the graph, checked against ONNX Runtime;
`eval` and `predict` on the .onnx file."""
import dataclasses
import json
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from clcli import export, probe  # noqa: E402
from clcli.cli import app  # noqa: E402
from clcli.cohort import build_cohort  # noqa: E402
from clcli.errors import ClcliError  # noqa: E402
from clcli.export import _onnx  # noqa: E402
from clcli.train import train  # noqa: E402

from _helpers import tiny_recipe  # noqa: E402

runner = CliRunner()
CLASSES = [f"c{i}" for i in range(10)]


def _network(models, size, stem, spliced=False, sites=None):
    """The first network of a cohort with its MKB half, its gate far from the identity (so the half changes the
    logits well beyond the tolerance), and the plain network it is built on."""
    plan = probe.plan(models, size, stem=stem, mkbs=1, num_classes=10, sites=sites)
    if spliced:  # test_resnet's residual add before the block activation: no module outputs it, fx splices it in
        site = plan.sites[0]
        nodes = [t for t in plan.models[0].taps if t.module is None and t.size == site.size
                 and t.channels == site.taps[0].channels]
        site.taps[0] = dataclasses.replace(nodes[0])
    net = build_cohort(plan, num_classes=10, seed=0, with_mkb=True).networks[0].eval()
    plain = build_cohort(plan, num_classes=10, seed=0, with_mkb=False).networks[0].eval()
    decoder_norm = net.mkb["site0"].decoder[-1]
    torch.nn.init.normal_(decoder_norm.weight, std=1.0, generator=torch.Generator().manual_seed(1))
    torch.nn.init.normal_(decoder_norm.bias, std=1.0, generator=torch.Generator().manual_seed(2))
    return net, plain, plan


def _manifest(model, size):
    return {"model": model, "input_size": [size, size], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2],
            "class_names": CLASSES}


def _refused(result, *words):
    """The CLI refused in one line (main() prints a ClcliError as one line, exit 2) with these words."""
    assert isinstance(result.exception, ClcliError), result.output
    message = str(result.exception)
    assert "\n" not in message and all(w in message for w in words), message


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


LAYOUTS = [  # (models, size, stem, spliced, sites (None: the planned one), tap layout, site kind)
    (["test_resnet", "test_efficientnet"], 32, "small", False, None, "NCHW", "hooked"),
    (["test_resnet", "test_efficientnet"], 32, "imagenet", True, None, "NCHW", "spliced"),
    (["test_mambaout", "test_resnet"], 64, "imagenet", False, ["8x8"], "NHWC", "hooked"),  # mambaout's stages.1
    (["test_vit", "test_resnet"], 64, "imagenet", False, None, "NLC", "hooked"),
]


@pytest.mark.parametrize("models, size, stem, spliced, sites, layout, kind", LAYOUTS,
                         ids=["nchw-hooked-small-stem", "nchw-spliced", "nhwc", "token-grid"])
def test_onnx_export_holds_the_mkb_half_and_matches_pytorch(tmp_path, models, size, stem, spliced, sites, layout,
                                                            kind):
    import onnx

    net, plain, plan = _network(models, size, stem, spliced, sites)
    tap = plan.sites[0].taps[0]
    assert tap.layout == layout and (tap.module is None) == (kind == "spliced")
    target = tmp_path / f"{models[0]}.onnx"
    result = _onnx.export_onnx(net, _manifest(models[0], size), target)
    onnx.checker.check_model(str(target), full_check=True)
    assert result["onnx_max_abs_error"] <= _onnx.ATOL

    x = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(7))  # not the check's batch
    got = _session(target).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        expected, without_half = net(x).numpy(), plain(x).numpy()
    assert _onnx.compare(got, expected)["within_tolerance"]
    assert not _onnx.compare(got, without_half)["within_tolerance"]  # the MKB half is in the graph

    meta = {p.key: p.value for p in onnx.load(str(target)).metadata_props}
    assert json.loads(meta["input_size"]) == [size, size] and json.loads(meta["class_names"]) == CLASSES
    assert json.loads(meta["mean"]) == [0.5, 0.4, 0.3] and json.loads(meta["std"]) == [0.2, 0.2, 0.2]
    manifest = export.read_onnx_manifest(target)
    assert manifest["onnx"]["opset"] == _onnx.OPSET
    assert manifest["onnx"]["check"]["max_abs_error"] == result["onnx_max_abs_error"]


def test_a_wrong_mkb_half_in_the_graph_fails_the_check_and_writes_nothing(tmp_path, monkeypatch):
    net, _, _ = _network(["test_resnet", "test_efficientnet"], 32, "small")
    # the same network with another gate (built anew: a deep copy's MKB hook would still call the original half)
    wrong, _, _ = _network(["test_resnet", "test_efficientnet"], 32, "small")
    wrong.load_state_dict(net.state_dict())
    torch.nn.init.normal_(wrong.mkb["site0"].decoder[-1].weight, std=1.0, generator=torch.Generator().manual_seed(9))
    real_graph = _onnx._graph
    monkeypatch.setattr(_onnx, "_graph", lambda n, example, model: real_graph(wrong, example, model))
    target = tmp_path / "test_resnet.onnx"
    with pytest.raises(ClcliError, match="outputs differ from PyTorch's") as error:
        _onnx.export_onnx(net, _manifest("test_resnet", 32), target)
    assert "\n" not in str(error.value)
    assert not target.exists() and not list(tmp_path.iterdir())  # no file, no temporary left behind


def test_the_batch_axis_is_dynamic(tmp_path):
    net, _, _ = _network(["test_resnet", "test_efficientnet"], 32, "small")
    target = tmp_path / "net.onnx"
    _onnx.export_onnx(net, _manifest("test_resnet", 32), target)
    session = _session(target)
    x = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(3)).numpy()
    batch7 = session.run(None, {"image": x})[0]
    one_by_one = np.concatenate([session.run(None, {"image": x[i:i + 1]})[0] for i in range(7)])
    assert batch7.shape == (7, 10)
    np.testing.assert_allclose(one_by_one, batch7, rtol=1e-5, atol=1e-5)


def test_an_unexportable_construct_is_one_line_naming_the_operator(tmp_path):
    class FiveDimAttention(torch.nn.Module):  # as Hiera's mask-unit attention: SDPA on 5-D tensors
        def forward(self, image):
            q = image.reshape(image.shape[0], 3, 4, -1, 8)
            return torch.nn.functional.scaled_dot_product_attention(q, q, q).flatten(1)

    with pytest.raises(ClcliError) as error:
        _onnx.export_onnx(FiveDimAttention(), _manifest("five_dim", 16), tmp_path / "x.onnx")
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith("five_dim cannot be exported to ONNX") and "scaled_dot_product_attention" in message
    assert not (tmp_path / "x.onnx").exists()


# --- the user's path: a trained run, `clcli export --onnx`, `eval` and `predict` on the .onnx file ------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    train(tiny_recipe(epochs=1), root / "run", show_progress=False)
    result = runner.invoke(app, ["export", str(root / "run"), "--onnx", "--out", str(root / "exp")])
    assert result.exit_code == 0, result.output
    assert "matched PyTorch in ONNX Runtime" in result.output
    return root / "exp"


def test_export_onnx_writes_one_checked_file_per_network(exported):
    index = json.loads((exported / "manifest.json").read_text())
    for entry in index["networks"]:
        assert (exported / entry["onnx_file"]).is_file() and entry["onnx_file"] == f"{entry['network']}.onnx"
        assert entry["onnx_max_abs_error"] <= _onnx.ATOL and entry["onnx_seconds"] > 0
        manifest = export.read_onnx_manifest(exported / entry["onnx_file"])
        assert manifest["mkb_halves"] and manifest["test_acc"] == entry["test_acc"]


@pytest.mark.parametrize("network", ["test_resnet", "test_efficientnet"])
def test_eval_on_the_onnx_file_agrees_with_the_safetensors_file(exported, network):
    accuracies = {}
    for suffix in ("safetensors", "onnx"):
        result = runner.invoke(app, ["eval", str(exported / f"{network}.{suffix}"), "--json"])
        assert result.exit_code == 0, result.output
        accuracies[suffix] = json.loads(result.stdout)
    assert accuracies["onnx"]["images"] == accuracies["safetensors"]["images"] == 200
    # stated tolerance: at most one image of 200 may change class on a near-tie between two logits
    assert abs(accuracies["onnx"]["top1"] - accuracies["safetensors"]["top1"]) <= 100 / 200


def test_predict_on_the_onnx_file_agrees_with_the_safetensors_file(exported, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    outputs = {}
    for suffix in ("safetensors", "onnx"):
        result = runner.invoke(app, ["predict", str(exported / f"test_resnet.{suffix}"), str(tmp_path), "--top", "3",
                                     "--json"])
        assert result.exit_code == 0, result.output
        outputs[suffix] = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(outputs["onnx"]) == 5
    for a, b in zip(outputs["safetensors"], outputs["onnx"]):
        assert a["file"] == b["file"] and [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        for ta, tb in zip(a["top"], b["top"]):
            assert ta["prob"] == pytest.approx(tb["prob"], abs=1e-4)


def test_predict_on_an_onnx_file_refuses_model(exported, tmp_path):
    result = runner.invoke(app, ["predict", str(exported / "test_resnet.onnx"), str(tmp_path), "--model",
                                 "test_resnet"])
    _refused(result, "drop --model")


def test_foreign_and_damaged_onnx_files_are_one_line_errors(exported, tmp_path):
    import onnx

    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes((exported / "test_resnet.onnx").read_bytes()[:1000])
    foreign = tmp_path / "foreign.onnx"
    model = onnx.load(str(exported / "test_resnet.onnx"))
    del model.metadata_props[:]
    onnx.save_model(model, str(foreign))
    for path, words in ((damaged, "not a readable ONNX file"), (foreign, "not a clcli ONNX export")):
        result = runner.invoke(app, ["eval", str(path)])
        _refused(result, words)


def test_export_onnx_without_the_extra_is_one_line_with_the_pip_command(exported, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed: importing it raises ImportError
    run_dir = exported.parent / "run"
    result = runner.invoke(app, ["export", str(run_dir), "--onnx", "--out", str(tmp_path / "exp")])
    _refused(result, "onnxscript", "pip install 'clcli[onnx]'")
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize("over", ["counted", "uncountable"])
def test_a_graph_over_protobufs_2_gib_is_written_with_external_data(over, tmp_path, monkeypatch):
    """A graph over 2 GiB (timm's largest networks, over 536 M float32 parameters) cannot be one protobuf message:
    it is written with ONNX's external data, `<name>.onnx` plus `<name>.onnx.data`, checked like any other, and loads
    and runs with the same outputs. Both where protobuf counts the graph's size and where counting it fails
    (EncodeError: over 2 GiB, or short of memory, as deepseek_vit_412m under the zoo sweep's 8 GiB cap). A later
    export that fits in one file removes the stale .data file it replaces."""
    import onnx

    net, _, _ = _network(["test_resnet", "test_efficientnet"], 32, "small")
    if over == "counted":
        monkeypatch.setattr(_onnx, "PROTOBUF_LIMIT", 1000)  # the tiny graph stands for one over the limit
    else:
        monkeypatch.setattr(_onnx, "_serialised", lambda proto: None)  # what protobuf says over 2 GiB
    target = tmp_path / "test_resnet.onnx"
    result = _onnx.export_onnx(net, _manifest("test_resnet", 32), target)
    assert result["onnx_data_file"] == "test_resnet.onnx.data" and result["onnx_max_abs_error"] <= _onnx.ATOL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test_resnet.onnx", "test_resnet.onnx.data"]
    graph = onnx.load(str(target), load_external_data=False)
    locations = [t.data_location for t in graph.graph.initializer if t.name and onnx.numpy_helper.to_array(
        t, base_dir=str(tmp_path)).nbytes >= _onnx.EXTERNAL_THRESHOLD]
    assert locations and set(locations) == {onnx.TensorProto.EXTERNAL}
    assert (tmp_path / "test_resnet.onnx.data").stat().st_size > 5 * target.stat().st_size  # the weights left the graph
    assert export.read_onnx_manifest(target)["onnx"]["external_data"] == "test_resnet.onnx.data"
    batch = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = net(batch)
    loaded = export.load_onnx(target)
    assert _onnx.compare(loaded(batch).numpy(), expected.numpy())["within_tolerance"]

    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / target.name).write_bytes(target.read_bytes())
    with pytest.raises(ClcliError, match=r"keeps its weights in test_resnet.onnx.data beside it, which is missing"):
        export.load_onnx(alone / target.name)

    monkeypatch.undo()
    result = _onnx.export_onnx(net, _manifest("test_resnet", 32), target)
    assert "onnx_data_file" not in result and sorted(p.name for p in tmp_path.iterdir()) == ["alone", target.name]
    assert export.read_onnx_manifest(target)["onnx"]["external_data"] is None
    assert _onnx.compare(export.load_onnx(target)(batch).numpy(), expected.numpy())["within_tolerance"]


def test_an_earlier_onnx_data_file_is_not_overwritten_without_force(exported, tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "test_resnet.onnx.data").write_bytes(b"the user's")
    result = runner.invoke(app, ["export", str(exported.parent / "run"), "--onnx", "--out", str(out)])
    _refused(result, "test_resnet.onnx.data already exists; use --force")
    assert sorted(p.name for p in out.iterdir()) == ["test_resnet.onnx.data"]
    assert (out / "test_resnet.onnx.data").read_bytes() == b"the user's"
