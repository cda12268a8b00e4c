"""The kinds of model the timm zoo sweep (benchmarks/train_zoo.py) found hard, each reproduced by a small hand-made
network registered with timm under a test-only name, so that the whole path (probe, MKBs, a CL step, rebuilding
from the halves) runs on it as on any timm model."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clcli import mkb, models, probe, recipes
from clcli.methods import Batch, create
from clcli.probe._graph import GNode
from clcli.probe._taps import cut_points, stream_cuts
from clcli.train import build_cohort


def _register(name: str, cls) -> str:
    import timm
    from timm.models import register_model

    if not timm.is_model(name):
        def build(pretrained=False, **kwargs):
            return cls(**kwargs)

        build.__name__ = name
        register_model(build)
    return name


def _conv_bn(cin, cout, k=3, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class PassesSkip(nn.Module):
    """Returns `[x, skip]` for the next block, as some timm blocks do."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv = _conv_bn(cin, cout, stride=stride)

    def forward(self, x):
        return [self.conv(x), x]


class TakesFirst(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv = _conv_bn(cin, cout, stride=stride)

    def forward(self, pair):
        x, _ = pair
        return self.conv(x)


class ListSkipNet(nn.Module):
    def __init__(self, num_classes=10, in_chans=3, **kwargs):
        super().__init__()
        self.stem = _conv_bn(in_chans, 16, stride=2)
        self.b1 = PassesSkip(16, 24, 2)
        self.b2 = TakesFirst(24, 32, 2)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.b2(self.b1(self.stem(x))).mean((2, 3)))


class RepStem(nn.Module):
    """RepVGG / MobileOne-style stem: a 3x3 and a 1x1 strided conv in parallel, added."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv_kxk = nn.Conv2d(cin, cout, 3, 2, 1)
        self.conv_1x1 = nn.Conv2d(cin, cout, 1, 2, 0)

    def forward(self, x):
        return F.relu(self.conv_kxk(x) + self.conv_1x1(x))


class RepStemNet(nn.Module):
    def __init__(self, num_classes=10, in_chans=3, **kwargs):
        super().__init__()
        self.stem = RepStem(in_chans, 16)
        self.stage1 = _conv_bn(16, 24, stride=2)
        self.stage2 = _conv_bn(24, 32, stride=2)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.stage2(self.stage1(self.stem(x))).mean((2, 3)))


class ClassTokenStage(nn.Module):
    """A PiT-like stage: the class token beside a patch grid of no input / 2**k size, returned as (map, token)."""

    def __init__(self, c):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.mlp = nn.Linear(c, c)

    def forward(self, x, cls_token):
        b, c, h, w = x.shape
        tokens = torch.cat([cls_token, x.flatten(2).transpose(1, 2)], dim=1)
        tokens = tokens + self.mlp(self.norm(tokens))
        return tokens[:, 1:].transpose(1, 2).reshape(b, c, h, w), tokens[:, :1]


class ClassTokenNet(nn.Module):
    def __init__(self, num_classes=10, in_chans=3, **kwargs):
        super().__init__()
        self.patch = nn.Conv2d(in_chans, 32, 6, 4)             # 32 px -> 7 x 7 (not 32 / 2**k)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 32))
        self.stage1 = ClassTokenStage(32)
        self.pool = nn.Conv2d(32, 32, 3, 2)                     # 7 x 7 -> 3 x 3 (not 32 / 2**k either)
        self.stage2 = ClassTokenStage(32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.patch(x)
        x, cls_token = self.stage1(x, self.cls_token.expand(x.shape[0], -1, -1))  # as PiT: the batch read after
        x, cls_token = self.stage2(self.pool(x), cls_token)
        return self.head(cls_token[:, 0])


def _cl_step(plan, size=32):
    """One CL training step on the plan's cohort; returns the cohort (in eval mode)."""
    cohort = build_cohort(plan, num_classes=10, seed=0, with_mkb=True)
    for net in cohort.networks:  # a non-zero start, so that every half changes its network's output
        for half in net.mkb.values():
            nn.init.normal_(half.decoder[-1].weight, std=0.1)
    method = create("cl", cohort, recipes.from_dict({"models": plan.names}))
    x, y = torch.randn(4, 3, size, size), torch.randint(0, 10, (4,))
    out = method(Batch([x] * len(plan.names), [y] * len(plan.names), [torch.arange(4)] * len(plan.names),
                       [x] * len(plan.names)))
    out["loss"].backward()
    torch.optim.SGD(method.parameters(), lr=0.1).step()
    return cohort.eval()


def _rebuilds_exactly(plan, cohort, index: int, size=32):
    """The network rebuilt from its manifest data (name, kwargs, stem, halves) gives exactly the same outputs, as
    `clcli.load` rebuilds an export."""
    m = plan.models[index]
    rebuilt = models.create(m.name, dict(m.kwargs, num_classes=10), stem=m.stem)
    mkb.attach(rebuilt, [mkb.HalfPlan.from_dict(h.to_dict()) for h in mkb.half_plans(plan, index, "mul")])
    rebuilt.load_state_dict(cohort.networks[index].state_dict(), strict=True)
    x = torch.randn(2, 3, size, size)
    assert torch.equal(rebuilt.eval()(x), cohort.networks[index](x))


# --- 1. a block that returns [x, skip] is never hooked as if it returned x ------------------------------------------

def test_a_block_returning_a_list_is_spliced_by_its_node_not_hooked():
    name = _register("clcli_test_listskip", ListSkipNet)
    m = probe.analyse(name, 32)
    assert all(t.module != "b1" for t in m.taps)          # b1 returns [x, skip]: no hook sees the tensor alone
    (b1_out,) = [t for t in m.taps if t.size == (8, 8) and t.node == "b1_conv_2"]
    assert b1_out.module is None and not b1_out.is_module_output
    assert {t.size: t for t in m.stage_taps}[(4, 4)].module == "b2"  # a block returning one tensor is still hooked
    plan = probe.plan([name, "test_resnet"], 32)
    plan.sites = [s for s in plan.candidates if s.taps[0].size == (8, 8)][:1]
    plan.sites[0].taps[0] = b1_out                        # the block's own output, spliced in by fx
    cohort = _cl_step(plan)                               # used to die with a TypeError inside conv2d
    _rebuilds_exactly(plan, cohort, 0)


# --- 2. --stem small changes every strided branch of a RepVGG-style stem --------------------------------------------

def test_small_stem_changes_every_parallel_strided_branch():
    name = _register("clcli_test_repstem", RepStemNet)
    small = probe.analyse(name, 32, stem="small")
    assert set(small.stem.convs) == {"stem.conv_kxk", "stem.conv_1x1"} and small.stem.pool is None
    assert [t.size for t in small.stage_taps][:3] == [(32, 32), (16, 16), (8, 8)]
    plan = probe.plan([name, "test_resnet"], 32, stem="small")
    _rebuilds_exactly(plan, _cl_step(plan), 0)
    restored = models.StemChange(**small.stem.to_dict())  # what plans and exports store
    assert restored == small.stem


def test_a_plain_stem_has_no_branches():
    assert probe.analyse("test_resnet", 32, stem="small").stem.branches == []


# --- 3. no equal and no x2 size: the nearest sizes, each encoder resampling to the one code size --------------------

def _tap(size, depth, name, channels=16):
    return probe.Tap(name, name, "NCHW", channels, size, size, 0, 0, depth, True)


def test_nearest_sizes_pair_when_no_equal_or_double_size_exists():
    from clcli.mkb._modules import MKBHalf, SpaceTransfer
    from clcli.probe._pairing import candidate_sites

    vit = [_tap(16, 0.65, "vit16", 32)]                        # a patch-14 ViT at 224 px: one 16 x 16 grid
    cnn = [_tap(56, 0.2, "cnn56"), _tap(28, 0.4, "cnn28"), _tap(14, 0.6, "cnn14", 24), _tap(7, 0.8, "cnn7")]
    sites = candidate_sites([vit, cnn])
    assert sites[0]["resized"] and sites[0]["pairing"] == "nearest"
    assert [t.module for t in sites[0]["taps"]] == ["vit16", "cnn14"] and sites[0]["size"] == [14, 14]
    assert all(s["pairing"] == "nearest" for s in sites)
    assert candidate_sites([cnn, cnn])[0]["pairing"] == "equal"

    spec = size_mkb_for(sites[0]["taps"])
    assert [h.resample for h in spec.halves] == ["adaptive", "adaptive"] and spec.code_height == 4
    transfer = SpaceTransfer(spec)
    for half_spec, tap in zip(spec.halves, sites[0]["taps"]):
        half = MKBHalf("NCHW", 0, half_spec, spec, transfer, "mul")
        nn.init.normal_(half.decoder[-1].weight)
        fused, embedding = half.fuse_and_embed(torch.randn(2, tap.channels, tap.height, tap.width))
        assert fused.shape == (2, tap.channels, tap.height, tap.width) and embedding.shape == (2, spec.embedding)


def size_mkb_for(taps):
    from clcli.mkb.spec import size_mkb

    return size_mkb([(t.channels, t.height, t.width) for t in taps], [10**6] * len(taps))


def test_a_nearest_size_plan_says_so_and_round_trips(monkeypatch):
    from typer.testing import CliRunner

    from clcli.cli import app
    from clcli.probe import _pairing

    real = _pairing.candidate_sites

    def no_equal_sizes(per_model):  # test_resnet vs test_efficientnet share sizes; hide them to force "nearest"
        per_model = [per_model[0], [dataclasses.replace(t, height=t.height + 1, width=t.width + 1)
                                    for t in per_model[1]]]
        return real(per_model)

    monkeypatch.setattr(_pairing, "candidate_sites", no_equal_sizes)
    plan = probe.plan(["test_resnet", "test_efficientnet"], 64, stem="small")
    assert plan.sites[0].pairing == "nearest" and "nearest size" in plan.notes[0]
    again = probe.Plan.from_dict(plan.to_dict())
    assert again.sites[0].pairing == "nearest" and again.notes == plan.notes
    result = CliRunner().invoke(app, ["probe", "test_resnet", "test_efficientnet", "--stem", "small",
                                      "--input-size", "64"])
    assert result.exit_code == 0 and "nearest size" in result.stdout


# --- 4. models with no plain cut point at a map: a class token beside the grid, grids of any size -------------------

def test_class_token_streams_and_odd_grid_sizes_get_taps():
    name = _register("clcli_test_clstoken", ClassTokenNet)
    m = probe.analyse(name, 32)
    sizes = {t.size: t for t in m.stage_taps}
    assert (7, 7) in sizes and (3, 3) in sizes
    assert sizes[(7, 7)].layout == "NCHW" and sizes[(7, 7)].channels == 32
    assert sizes[(7, 7)].module != "stage1"  # stage1 returns (map, token): not hookable
    plan = probe.plan([name, "test_resnet"], 32)
    _rebuilds_exactly(plan, _cl_step(plan), 0)


class ClassTokenNetToPowerOfTwo(ClassTokenNet):
    """The same, but its pooled map is 4 x 4 (= 32 / 2**3)."""

    def __init__(self, num_classes=10, in_chans=3, **kwargs):
        super().__init__(num_classes, in_chans)
        self.pool = nn.Conv2d(32, 32, 3, 2, 1)                  # 7 x 7 -> 4 x 4


def test_a_map_flattened_channels_first_is_not_read_as_a_token_grid():
    # stage1 flattens its 7 x 7 map to (B, 32, 49) before the transpose: from the shape alone that passes for 7 class
    # tokens + a 5 x 5 grid of 49 channels (a 6 px patch tiles 32 px 5 times). Its 4-d input shows what it is.
    m = probe.analyse(_register("clcli_test_clstoken_pow2", ClassTokenNetToPowerOfTwo), 32)
    taps = {(t.node, t.size, t.layout, t.prefix_tokens) for t in m.taps}
    assert ("patch", (7, 7), "NCHW", 0) in taps and ("pool", (4, 4), "NCHW", 0) in taps
    assert all(size == (4, 4) and prefix <= 1 for _, size, layout, prefix in taps if layout == "NLC"), taps


def _graph(edges: dict[str, list[str]], no_tensor=()):
    names = list(edges)
    nodes = [GNode(n, "placeholder" if i == 0 else "output" if i == len(names) - 1 else "call_module", n, (), (1,),
                   tensor=n not in no_tensor, inputs=[names.index(x) for x in edges[n]]) for i, n in enumerate(names)]
    for i, n in enumerate(nodes):
        for j in n.inputs:
            nodes[j].users.append(i)
    return nodes


def test_stream_cuts_let_side_streams_and_sizes_jump_but_not_a_residual_skip():
    # two streams (a: a1 -> a2, b: b1 -> b2) fused at the end; a shape read `s` jumps over a block; a residual skip
    # r0 -> add jumps over r1.
    nodes = _graph({"x": [], "a1": ["x"], "b1": ["x"], "s": ["a1"], "a2": ["a1"], "b2": ["b1"], "r1": ["a2"],
                    "add": ["a2", "r1", "s"], "fuse": ["add", "b2"], "out": ["fuse"]}, no_tensor={"s"})
    names = lambda idx: [nodes[i].name for i in idx]  # noqa: E731
    assert names(cut_points(nodes)) == ["fuse"]
    assert "r1" not in names(stream_cuts(nodes))   # inside the residual block (a2 jumps over it and feeds it)
    assert {"b2", "add"} <= set(names(stream_cuts(nodes)))


class OddPatchMixer(nn.Module):
    """ConvMixer's shape: a 7-pixel patch embedding (56 px -> 8 x 8, not 56 / 2**k), residual blocks at that size,
    then global pooling. Its only tap at an input / 2**k size is the pooled 1 x 1."""

    def __init__(self, num_classes=10, in_chans=3, **kwargs):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 32, 7, 7), nn.BatchNorm2d(32), nn.ReLU())
        self.blocks = nn.Sequential(*[_conv_bn(32, 32) for _ in range(3)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.fc(self.pool(x).flatten(1))


def test_a_model_whose_maps_are_not_input_over_a_power_of_two_gets_a_site():
    name = _register("clcli_test_odd_patch", OddPatchMixer)
    m = probe.analyse(name, 56)
    assert {t.size for t in m.stage_taps} >= {(8, 8)}, m.stage_taps
    plan = probe.plan([name, "test_resnet"], 56)
    _rebuilds_exactly(plan, _cl_step(plan, 56), 0, 56)


class PositionTableNet(nn.Module):
    """A relative-position table sized for the 16 px input it was made for (MViTv2's kind): at 32 px it is indexed
    past its end. Meta tensors carry no values, so the probe's trace passes; only a real forward fails."""

    def __init__(self, num_classes=10, in_chans=3, **kwargs):
        super().__init__()
        self.stem = _conv_bn(in_chans, 16, stride=2)
        self.stage = _conv_bn(16, 16, stride=2)
        self.table = nn.Parameter(torch.zeros(16, 16))  # (16 / 4)**2 positions
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.stage(self.stem(x))
        positions = torch.arange(x.shape[2] * x.shape[3], device=x.device)
        x = x + self.table[positions].t().reshape(1, 16, x.shape[2], x.shape[3])
        return self.fc(x.mean((2, 3)))


def test_a_model_that_fails_only_on_real_values_is_a_one_line_error_before_training(tmp_path):
    from clcli.cohort import check_networks_run
    from clcli.errors import ClcliError

    name = _register("clcli_test_position_table", PositionTableNet)
    check_networks_run(build_cohort(probe.plan([name, "test_resnet"], 16), num_classes=10, seed=0, with_mkb=True),
                       "cpu")
    plan = probe.plan([name, "test_resnet"], 32)   # the probe cannot see it
    cohort = build_cohort(plan, num_classes=10, seed=0, with_mkb=True)
    with pytest.raises(ClcliError, match=r"clcli_test_position_table fails on a 32x32 input \(IndexError: .*\); try"):
        check_networks_run(cohort, "cpu")
    assert cohort.networks[0].training  # left as it was
