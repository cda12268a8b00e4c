import json

import pytest
import torch
from typer.testing import CliRunner

from clcli import probe
from clcli.cli import app
from clcli.errors import ClcliError
from clcli.mkb.spec import size_mkb
from clcli.probe._graph import GNode
from clcli.probe._taps import cut_points

runner = CliRunner()


def _node(name, inputs):
    return GNode(name, "call_function", name, (), (1,), inputs=inputs)


def test_cut_points_skip_the_inside_of_a_residual_block():
    # x -> a -> b -> add(a, b) -> c : the skip edge a->add jumps over b, so b is not a cut point.
    nodes = [GNode("x", "placeholder", "x", (), (1,)), _node("a", [0]), _node("b", [1]), _node("add", [1, 2]),
             _node("c", [3]), GNode("out", "output", "output", (), None, inputs=[4])]
    for i, n in enumerate(nodes):
        for j in n.inputs:
            nodes[j].users.append(i)
    assert [nodes[i].name for i in cut_points(nodes)] == ["a", "add", "c"]


def test_nchw_taps_are_stage_outputs():
    m = probe.analyse("test_resnet", 64)
    modules = [t.module for t in m.stage_taps]
    assert modules[:5] == ["act1", "layer1", "layer2", "layer3", "layer4"]
    layer2 = m.stage_taps[2]
    assert (layer2.layout, layer2.channels, layer2.height, layer2.width) == ("NCHW", 48, 8, 8)
    assert all(t.is_module_output for t in m.stage_taps)
    depths = [t.depth for t in m.stage_taps]
    assert depths == sorted(depths) and 0 < depths[0] and depths[-1] < 1


@pytest.mark.parametrize("name", ["test_convnext", "test_efficientnet", "test_mambaout", "test_nfnet"])
def test_a_first_stage_that_keeps_the_stem_size_offers_its_own_output(name):
    # ConvNeXt's stages.0, EfficientNet's blocks.0, ...: the stage timm's feature_info names, not the stem before it
    # (a tap of the same size at depth ~0.01 is no stage output)
    m = probe.analyse(name, 32)
    assert m.feature_stages, "timm's feature_info was not read"
    offered = {t.node: t for t in m.stage_taps}
    ends = {node: module for module, node, _, _ in m.feature_stages if node}
    sizes = {t.node: t.size for t in m.taps}
    for node, module in ends.items():
        if node in sizes and min(sizes[node]) >= 2:
            assert node in offered, f"{name}: stage {module} ({sizes[node]}) not offered: {list(offered)}"
    first = m.feature_stages[0]
    assert offered[first[1]].module == first[0]


def test_token_grid_taps_of_a_vit():
    m = probe.analyse("test_vit", 64)
    taps = [t for t in m.stage_taps if t.layout == "NLC"]
    assert taps and all(t.module.startswith("blocks.") for t in taps)
    assert {(t.height, t.width, t.prefix_tokens, t.channels) for t in taps} == {(4, 4, 1, 64)}


def test_nhwc_taps_are_detected():
    m = probe.analyse("test_mambaout", 64)
    layouts = {t.module: t.layout for t in m.stage_taps}
    assert layouts["stages.1"] == "NHWC"


def test_small_stem_keeps_resolution_and_is_found_generically():
    big = probe.analyse("test_resnet", 32)
    small = probe.analyse("test_resnet", 32, stem="small")
    assert small.stem.conv == "conv1.0" and small.stem.pool == "maxpool"
    big_h = {t.module: t.height for t in big.stage_taps}
    small_h = {t.module: t.height for t in small.stage_taps}
    assert small_h["layer4"] == 4 * big_h["layer4"] == 4  # stride-1 conv and no pooling: 4x less downsampling
    eff = probe.analyse("test_efficientnet", 32, stem="small")
    assert eff.stem.conv == "conv_stem" and eff.stem.pool is None


def test_plan_prefers_equal_sizes_early_past_the_stem_and_spreads_sites():
    p = probe.plan(["test_resnet", "test_efficientnet"], 64, stem="small", mkbs=2)
    assert len(p.sites) == 2
    assert len({t.size for t in p.sites[0].taps}) == 1  # equal H x W where both networks have it at a good place
    assert all(0 <= t.place < 1 for site in p.sites for t in site.taps)  # never the stem, never before the head
    # the first site: one network at its first stage past the stem (test_efficientnet's blocks.1, place 0), the
    # other one stage later (test_resnet's layer2), rather than the efficientnet's stem-level blocks.0 at 64x64
    assert [(t.module, t.place) for t in p.sites[0].taps] == [("layer2", 0.3333), ("blocks.1", 0.0)]
    for site in p.candidates:
        assert min(site.size) >= 2                     # never the pooled classifier vector
    assert p.candidates[0].score >= p.candidates[-1].score
    assert p.sites[0].size != p.sites[1].size


def test_sizing_rule_keeps_paper_embedding_and_budget():
    spec = size_mkb([(256, 8, 8), (32, 8, 8)], [21_000_000, 2_200_000])
    assert (spec.code_channels, spec.code_height, spec.code_width) == (64, 4, 4)
    assert spec.embedding == 1024
    assert spec.within_budget
    assert all(h.params <= 0.10 * 2_200_000 for h in spec.halves)
    assert [h.resample for h in spec.halves] == ["x2", "x2"]
    tight = size_mkb([(256, 4, 4), (32, 4, 4)], [21_000_000, 100_000])
    assert tight.code_channels < 64 or tight.halves[0].kernel == 1
    assert tight.halves[0].params < spec.halves[0].params


def test_three_models_share_sites_common_to_all():
    p = probe.plan(["test_resnet", "test_efficientnet", "test_convnext"], 64, stem="small")
    assert all(len(s.taps) == 3 for s in p.candidates)
    assert len(p.sites[0].mkb.halves) == 3


def test_json_plan_round_trips():
    result = runner.invoke(app, ["probe", "test_resnet", "test_vit", "--input-size", "64", "--json"])
    assert result.exit_code == 0, result.output
    raw = json.loads(result.stdout)
    assert raw["version"] == probe.PLAN_VERSION
    plan = probe.Plan.from_dict(raw)
    assert plan.to_dict() == raw
    assert plan.sites[0].taps[1].layout == "NLC"


def test_table_output_names_the_planned_site():
    result = runner.invoke(app, ["probe", "test_resnet", "test_efficientnet", "--stem", "small"])
    assert result.exit_code == 0, result.output
    assert "MKB sites" in result.stdout and "layer" in result.stdout and "small stem" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["resnet_does_not_exist", "test_resnet"], "unknown model 'resnet_does_not_exist'"),
        (["test_resnet"], "at least 2 models"),
        (["test_resnet", "test_vit", "--input-size", "2"], "bad input size"),
        (["test_resnet", "test_efficientnet", "--stem", "tiny"], "unknown stem"),
    ],
)
def test_user_errors_are_one_line_exit_2(args, message):
    from clcli.cli import main

    result = runner.invoke(app, ["probe", *args])
    assert isinstance(result.exception, ClcliError) and message in str(result.exception)
    with pytest.raises(SystemExit) as exit_info:
        import sys

        old = sys.argv
        sys.argv = ["clcli", "probe", *args]
        try:
            main()
        finally:
            sys.argv = old
    assert exit_info.value.code == 2


def test_unknown_model_suggests_close_names():
    with pytest.raises(ClcliError, match="did you mean.*resnet34"):
        probe.plan(["resnet43", "resnet18"])


def test_no_shared_size_names_the_nearest_sizes():
    # test_vit's only map is the 4x4 patch grid at 64 px; test_resnet at 16 px has 8, 4, 2 maps but no 4x4 ... so
    # compare two fixed-size ViTs at sizes that give different grids instead: 64 px -> 4x4 vs 2x2 is a ratio of 2,
    # so ask for input sizes where nothing overlaps at all.
    with pytest.raises(ClcliError, match="no MKB site at input 16x16: test_vit has no feature map of 2x2"):
        probe.plan(["test_vit", "test_resnet"], 16)


def test_export_fallback_when_fx_fails(monkeypatch):
    import clcli.probe._graph as graph

    def broken_fx(model, example):
        raise RuntimeError("symbolically traced variables cannot be used as inputs to control flow")

    monkeypatch.setattr(graph, "_fx_graph", broken_fx)
    m = probe.analyse("test_resnet", 64)
    assert m.tracer == "export"
    assert [t.size for t in m.stage_taps][:4] == [(32, 32), (16, 16), (8, 8), (4, 4)]


def test_model_that_neither_tracer_handles_is_a_clear_error(monkeypatch):
    import clcli.probe._graph as graph

    def broken(model, example):
        raise RuntimeError("boom")

    monkeypatch.setattr(graph, "_fx_graph", broken)
    monkeypatch.setattr(graph, "_export_graph", broken)
    with pytest.raises(ClcliError, match="cannot analyse.*fx failed.*torch.export failed"):
        probe.analyse("test_resnet", 64)


def test_a_model_that_refuses_the_input_size_says_so_in_one_line(capfd):
    # halonet asserts its input is a multiple of its block size; fx's ShapeProp printed that traceback before.
    with pytest.raises(ClcliError, match=r"halonet_h1 fails on a 32x32 input by itself.*try --input-size 256"):
        probe.analyse("halonet_h1", 32)
    assert "Traceback" not in capfd.readouterr().err


def test_shapes_match_a_real_forward():
    import timm

    m = probe.analyse("test_efficientnet", 64)
    model = timm.create_model("test_efficientnet", num_classes=10).eval()
    seen = {}
    for tap in m.stage_taps:
        model.get_submodule(tap.module).register_forward_hook(
            lambda mod, i, o, name=tap.module: seen.__setitem__(name, tuple(o.shape)))
    model(torch.zeros(1, 3, 64, 64))
    for tap in m.stage_taps:
        assert seen[tap.module] == (1, tap.channels, tap.height, tap.width)


class _ListBlock(torch.nn.Module):
    """Returns [x, skip]: a hook sees a list, never the tap."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return [self.conv(x) + x, x]


class _HookTraps(torch.nn.Module):
    """A block returning a list, a block called twice, and a block returning one tensor."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.ReLU())
        self.listed = _ListBlock()
        self.twice = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU())
        self.down = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, 2, 1), torch.nn.ReLU())
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        x, skip = self.listed(self.stem(x))
        x = self.down(self.twice(self.twice(x)) + skip)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("name", ["hook_traps", "test_resnet", "test_efficientnet", "test_vit", "test_convnext"])
def test_what_the_trace_says_each_module_returns_is_what_a_hooked_forward_sees(name):
    """The hook check reads each module's returns from the fx trace (no second forward): for every module the trace
    calls, the same output shapes per call as forward hooks record in a forward of its own."""
    import timm

    from clcli.probe import _hooked_forward, _traced

    with torch.device("meta"):
        model = _HookTraps() if name == "hook_traps" else timm.create_model(name, num_classes=10)
    model, graph = _traced(model, 3, (64, 64))
    paths = set(graph.module_returns)
    shapes = {n.name: n.shape for n in graph.nodes}
    traced = {p: [shapes.get(node) for node in graph.module_returns.get(p, [])] for p in paths}
    assert traced == _hooked_forward(model, paths, 3, (64, 64))
    if name == "hook_traps":
        assert traced["listed"] == [None] and len(traced["twice"]) == 2 and traced["down"] == [(1, 16, 16, 16)]


def test_channels_first_tokens_are_not_mistaken_for_a_token_grid():
    from clcli.probe._taps import _layout

    # LeViT flattens (B, 128, 14, 14) to (B, 128, 196): 128 "tokens" would need a guessed prefix of 7 around an
    # 11 x 11 grid, while the last dim is the real 14 x 14 grid.
    assert _layout((1, 128, 196), (224, 224), None, None) is None
    # a ViT whose model declares its class token keeps its grid even when C happens to be a square number
    assert _layout((1, 5, 64), (32, 32), 1, None) == ("NLC", 64, 2, 2, 1)
    assert _layout((1, 197, 192), (224, 224), None, None) == ("NLC", 192, 14, 14, 1)


def _tap(size, depth, name):
    return probe.Tap(name, name, "NCHW", 16, size, size, 0, 0, depth, True)


def test_sizes_in_a_ratio_of_2_pair_as_x2_and_further_as_nearest():
    from clcli.mkb._modules import MKBHalf, SpaceTransfer
    from clcli.probe._pairing import candidate_sites

    a = [_tap(16, 0.2, "a16"), _tap(8, 0.5, "a8"), _tap(4, 0.8, "a4")]
    b = [_tap(32, 0.1, "b32"), _tap(2, 0.9, "b2")]  # b halves every side of a's, a's 8 and 4 sit between b's
    pairs = {tuple(t.module for t in s["taps"]): s["pairing"] for s in candidate_sites([a, b])}
    assert pairs[("a16", "b32")] == pairs[("a4", "b2")] == "x2"
    assert pairs[("a8", "b2")] == "nearest"  # a ratio of 4: resampled, and scored lower for it
    assert candidate_sites([a, a])[0]["pairing"] == "equal"

    spec = size_mkb([(16, 4, 4), (16, 2, 2)], [10**6, 10**6])
    assert [h.resample for h in spec.halves] == ["x2", "none"]
    transfer = SpaceTransfer(spec)
    for half_spec, side in zip(spec.halves, (4, 2)):
        half = MKBHalf("NCHW", 0, half_spec, spec, transfer, "mul")
        torch.nn.init.normal_(half.decoder[-1].weight)
        fused, embedding = half.fuse_and_embed(torch.randn(2, 16, side, side))
        assert fused.shape == (2, 16, side, side) and embedding.shape == (2, spec.embedding)


def test_the_table_says_when_sites_pair_different_sizes(monkeypatch):
    from clcli.probe import _pairing

    real = _pairing.candidate_sites
    def as_x2(taps):
        sites = real(taps)
        for site in sites:
            site.update(resized=True, pairing="x2")
        return sites

    monkeypatch.setattr(_pairing, "candidate_sites", as_x2)
    result = runner.invoke(app, ["probe", "test_resnet", "test_efficientnet", "--stem", "small"])
    assert result.exit_code == 0, result.output
    assert "ratio of 2" in result.stdout


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["probe", "--help"], ["train", "--help"],
                                  ["export", "--help"]])
def test_help_and_version_answer_without_importing_torch_or_timm(args):
    import subprocess
    import sys

    code = ("import sys\nfrom clcli.cli import app\ntry:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    code = e.code\nheavy = [m for m in ('torch', 'timm', 'datasets') if m in sys.modules]\n"
            "print('HEAVY', heavy)\nsys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout
    if args == ["--version"]:
        from clcli import __version__

        assert f"clcli {__version__}" in done.stdout


def test_two_sizes_never_share_a_stage_label():
    # 33 px through an ImageNet stem: 17, 9, 5, 3, 2; round(log2(33 / size)) labelled both 5 and 3 as stage 3
    taps = probe.analyse("test_resnet", 33).taps
    sizes_of = {}
    for t in taps:
        sizes_of.setdefault(t.stage, set()).add(t.size)
    assert all(len(sizes) == 1 for sizes in sizes_of.values()), sizes_of
    by_size = sorted({(t.height, t.stage) for t in taps}, reverse=True)
    assert [stage for _, stage in by_size] == sorted(stage for _, stage in by_size)  # smaller size, higher stage


def test_a_vit_input_that_is_no_multiple_of_its_patches_is_noted_or_refused():
    """A patch embedding that floors the input to whole patches is noted; timm's default ViT refuses such an input,
    and the probe refuses it with a one-line error naming why."""
    import timm

    from clcli.probe import _patch_notes

    flooring = timm.create_model("test_vit", img_size=33)  # built for 33 px: it floors to 2x2 patches
    (note,) = _patch_notes("test_vit", flooring, (33, 33))
    assert "33x33 px is not a multiple of its 16x16 px patches" in note and "token grid is 2x2" in note
    assert _patch_notes("test_vit", flooring, (64, 64)) == []
    with pytest.raises(ClcliError, match="divisible by patch size"):  # the CLI prints it as one line, exit 2
        probe.plan(["test_vit", "test_resnet"], 33)


def test_fallback_trace_runs_a_model_with_real_buffers(monkeypatch):
    """Where the meta trace fails (test_coatnet's relative positions under --stem small), the real trace runs a
    model built for real: its integer buffers hold their values, not the memory a `to_empty` model holds, so the
    refusal names the model's real limit."""
    from clcli import models
    from clcli.probe import _graph

    real_trace, seen = _graph.trace, []

    def spy(model, x, export=True):
        if x.device.type != "meta":
            seen.append({k: b.clone() for k, b in model.named_buffers() if not b.is_floating_point()})
        return real_trace(model, x, export)

    monkeypatch.setattr(_graph, "trace", spy)
    with pytest.raises(ClcliError, match="size of tensor"):
        probe.analyse("test_coatnet", 32, stem="small")
    expected = {k: b for k, b in models.create("test_coatnet", models.model_kwargs("test_coatnet", num_classes=10))
                .named_buffers() if not b.is_floating_point()}
    assert seen and any("index" in k for k in seen[0])
    for buffers in seen:
        assert buffers.keys() == expected.keys()
        assert all(torch.equal(buffers[k], expected[k]) for k in expected)
