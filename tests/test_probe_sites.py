"""Where the probe finds taps and where it puts MKB sites (issue 28): every stage of a network is a tap whatever its
spatial size, and each network's site sits past its stem and before its head (early, where the site study found
CL helps most)."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from clcli import probe
from clcli.errors import ClcliError
from clcli.probe import _module_taps, _traced
from clcli.probe._pairing import EXTREMES, candidate_sites
from clcli.probe._taps import stage_taps

DATA = Path(__file__).parent / "data"


def _stage(cin, cout, k, stride, pad=0):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad), nn.BatchNorm2d(cout), nn.ReLU())


def _taps_of(net: nn.Module, side: int) -> list[probe.Tap]:
    return _module_taps(net, _traced(net, 3, (side, side))[1], 3, (side, side))


class ValidPadding(nn.Module):
    """40 px: a padded stride-2 stem (20 = 40 / 2), then valid convolutions: 18, 8, 4, none of them 40 / 2**k."""

    def __init__(self):
        super().__init__()
        self.stem = _stage(3, 8, 3, 2, pad=1)
        self.stage1 = _stage(8, 8, 3, 1)
        self.stage2 = _stage(8, 16, 3, 2)
        self.stage3 = _stage(16, 16, 2, 2)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.head(x.mean((2, 3)))


def test_valid_padding_stages_are_each_a_tap():
    with torch.device("meta"):
        net = ValidPadding()
    found = {t.module: t.size for t in stage_taps(_taps_of(net, 40))}
    assert found == {"stem": (20, 20), "stage1": (18, 18), "stage2": (8, 8), "stage3": (4, 4)}


class TwoBranches(nn.Module):
    """Branches that meet only through a reshape and a concat: `b, _, h, w = x.shape` is read at the start and used
    at the join (as Twins and PVT do), and the 16 px branch runs while the 8 px one waits beside it (as HRNet's
    branches do)."""

    def __init__(self):
        super().__init__()
        self.stem = _stage(3, 8, 3, 1, pad=1)          # 32
        self.high = _stage(8, 8, 3, 2, pad=1)          # 16, beside `low`
        self.low = _stage(8, 8, 5, 4, pad=2)           # 8
        self.down = _stage(8, 8, 3, 2, pad=1)          # 16 -> 8
        self.mix = nn.Linear(16, 16)
        self.last = _stage(16, 16, 3, 2, pad=1)        # 4
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        b, _, h, w = x.shape
        x = self.stem(x)
        low = self.low(x)
        high = self.high(x)  # while it runs, `low` waits beside it: no plain cut point, a stream cut
        tokens = torch.cat([self.down(high).flatten(2), low.flatten(2)], 1).transpose(1, 2)  # (B, 64, 16)
        x = self.mix(tokens).transpose(1, 2).reshape(b, 16, h // 4, w // 4)
        return self.head(self.last(x).mean((2, 3)))


def test_branches_joined_by_reshape_and_concat_keep_their_stage_taps():
    with torch.device("meta"):
        net = TwoBranches()
    taps = _taps_of(net, 32)
    by_size = {}
    for t in taps:
        by_size.setdefault(t.size, []).append(t.module or t.node)
    assert {(32, 32), (16, 16), (8, 8), (4, 4)} <= set(by_size), by_size
    assert "stem" in by_size[(32, 32)]              # a cut point once the shape read at the start may jump it
    assert "high" in by_size[(16, 16)]              # the branch beside the other one: a stream cut
    assert by_size[(4, 4)] == ["last.0", "last.1", "last"]  # the concat of flattened maps is no 4x4 token grid


def _tap(name, size, depth, layout="NCHW"):
    return probe.Tap(name, name, layout, 16, size, size, 1 if layout == "NLC" else 0, 0, depth, True)


def test_a_cnn_and_vit_pair_sits_mid_to_late_in_both():
    # A ResNet-like CNN at 32 px and a patch-16 ViT: the only equal size, 2x2, is the CNN's last stage, right
    # before its head. Ranked on the mean depth (0.97 and the ViT's 0.65: 0.81, near the target) it was chosen.
    cnn = [_tap("act1", 16, 0.04), _tap("layer1", 8, 0.3), _tap("layer2", 4, 0.6), _tap("layer3", 2, 0.97)]
    vit = [_tap(f"blocks.{i}", 2, d, "NLC") for i, d in ((5, 0.5), (7, 0.65), (9, 0.8))]
    sites = candidate_sites([cnn, vit])
    equal = [s for s in sites if s["pairing"] == "equal"]
    assert equal and all(s["taps"][0].module == "layer3" for s in equal)  # an equal size exists, but only there
    best = sites[0]
    assert all(EXTREMES[0] <= t.depth <= EXTREMES[1] for t in best["taps"]), best
    assert [t.module for t in best["taps"]] == ["layer2", "blocks.7"] and best["pairing"] == "x2"


def test_nearest_sizes_at_a_good_depth_beat_an_equal_size_at_the_stem():
    # Both models share only 32x32, at their stems; their middles are 8x8 and 4x4 apart by a ratio of 2, their
    # later stages by a ratio of 4.
    a = [_tap("a32", 32, 0.01), _tap("a8", 8, 0.6), _tap("a4", 4, 0.95)]
    b = [_tap("b32", 32, 0.02), _tap("b16", 16, 0.3), _tap("b2", 2, 0.7)]
    best = candidate_sites([a, b])[0]
    assert [t.module for t in best["taps"]] != ["a32", "b32"]
    assert all(EXTREMES[0] <= t.depth <= EXTREMES[1] for t in best["taps"]), best


def _placed_tap(name, size, place):
    return probe.Tap(name, name, "NCHW", 16, size, size, 0, 0, 0.5, True, place=place)


def test_the_first_stage_past_the_stem_wins_then_each_later_one_less():
    # the site study (docs/results.md section 5): at equal sizes, each network's first stage past the stem (place 0)
    # beat every later single site; the stem (place < 0) and the last stage's end (place 1) come last
    a = [_placed_tap("a16", 16, -1 / 3), _placed_tap("a8", 8, 0.0), _placed_tap("a4", 4, 1 / 3),
         _placed_tap("a2", 2, 2 / 3)]
    b = [_placed_tap("b16", 16, -1 / 3), _placed_tap("b8", 8, 0.0), _placed_tap("b4", 4, 1 / 3),
         _placed_tap("b2", 2, 2 / 3)]
    equal = [[t.module for t in s["taps"]] for s in candidate_sites([a, b]) if s["pairing"] == "equal"]
    assert equal == [["a8", "b8"], ["a4", "b4"], ["a16", "b16"], ["a2", "b2"]]
    # one network's stem never carries the site to suit the other: its first stage one size smaller wins
    c = [_placed_tap("c16", 16, -1 / 3), _placed_tap("c8", 8, 0.0), _placed_tap("c4", 4, 1 / 3)]
    d = [_placed_tap("d16", 16, 0.0), _placed_tap("d8", 8, 1 / 3), _placed_tap("d4", 4, 2 / 3)]
    assert [t.module for t in candidate_sites([c, d])[0]["taps"]] == ["c8", "d8"]


def test_the_study_pairs_plan_their_measured_best_single_site():
    # docs/results.md section 5: one MKB at 8x8, each network's first stage past the stem, on the three pairs trained
    # where a network overfits (not on pair 3, where both underfit and CL helped at no site)
    for names, modules in ((["resnet10t", "regnetx_002"], ["layer1", "s1"]),
                           (["resnet10t", "convnext_atto"], ["layer1", "stages.0"]),
                           (["repvgg_a0", "regnetx_004"], ["stages.0", "s1"])):
        plan = probe.plan(names, 32)
        assert [t.module for t in plan.sites[0].taps] == modules and plan.sites[0].size == (8, 8)


def test_every_size_all_networks_share_stays_listed_however_low_it_scores():
    # at 32 px with a small stem the two meet at 4x4 only at test_resnet's last stage (place 1): it ranks below
    # the 8 best size combinations, but `--site 4x4`, `cl.sites: [all]` and clcli tune's default space name it
    plan = probe.plan(["test_resnet", "test_efficientnet"], 32, stem="small")
    shared = probe.equal_sizes(plan.candidates)
    assert "4x4" in shared and plan.candidates[shared["4x4"] - 1].score < plan.candidates[7].score
    (site,) = probe.plan(["test_resnet", "test_efficientnet"], 32, stem="small", sites=["4x4"]).sites
    assert site.size == (4, 4) and site.pairing == "equal"


def test_equal_sizes_win_at_equal_depths():
    a = [_tap("a16", 16, 0.4), _tap("a8", 8, 0.65)]
    b = [_tap("b16", 16, 0.4), _tap("b8", 8, 0.65), _tap("b4", 4, 0.7)]
    best = candidate_sites([a, b])[0]
    assert [t.module for t in best["taps"]] == ["a8", "b8"] and best["pairing"] == "equal"


def test_an_isotropic_trunk_offers_blocks_at_several_depths():
    m = probe.analyse("test_vit", 64)
    depths = [t.depth for t in m.stage_taps if t.layout == "NLC"]
    assert len(depths) >= 2 and max(depths) - min(depths) > 0.1


def test_two_mkbs_never_share_a_tap():
    p = probe.plan(["test_resnet", "test_vit"], 64, mkbs=2)
    for i in range(2):
        assert p.sites[0].taps[i].node != p.sites[1].taps[i].node


def test_the_default_plan_is_one_mkb_and_all_is_one_at_every_shared_size():
    """One MKB by default (several at once took the quickstart's small network to chance: docs/results.md section 5,
    the site study); `--site all` plans one at every map size where every network has a tap."""
    models = ["test_resnet", "test_efficientnet"]
    default = probe.plan(models, 32, stem="small")
    assert len(default.sites) == 1 and default.sites[0] is default.candidates[0]
    every = probe.plan(models, 32, stem="small", sites=["all"])
    sizes = probe.equal_sizes(every.candidates)
    assert len(sizes) >= 2 and len(every.sites) == len(sizes)
    assert sorted(f"{s.size[0]}x{s.size[1]}" for s in every.sites) == sorted(sizes)
    assert all(s.pairing == "equal" for s in every.sites)


def test_a_site_chosen_by_its_number_is_planned_and_trained(tmp_path):
    """`clcli probe --site N` and the recipe's cl.sites plan the listed site N instead of the best: the table numbers
    the sites and marks the planned one; the run trains exactly that site."""
    from typer.testing import CliRunner

    from clcli import train as train_lib
    from clcli.cli import app
    from _helpers import tiny_recipe

    best = probe.plan(["test_resnet", "test_efficientnet"], 32, stem="small")
    assert len(best.candidates) >= 3 and best.sites[0] is best.candidates[0]
    third = probe.plan(["test_resnet", "test_efficientnet"], 32, stem="small", sites=[3])
    assert [s.to_dict() for s in third.candidates] == [s.to_dict() for s in best.candidates]  # numbers stay put
    assert third.sites == [third.candidates[2]] and third.sites[0].to_dict() != best.sites[0].to_dict()
    result = CliRunner().invoke(app, ["probe", "test_resnet", "test_efficientnet", "--stem", "small", "--site", "3"])
    assert result.exit_code == 0, result.output
    marks = [line.split("│")[1].strip() for line in result.stdout.splitlines()
             if line.startswith("│") and line.split("│")[1].strip()]
    assert marks[-len(best.candidates):] == [f"{n}{'*' if n == 3 else ''}" for n in
                                              range(1, len(best.candidates) + 1)]

    recipe = tiny_recipe(epochs=1)
    recipe.data.train_limit, recipe.data.test_limit = 64, 32
    recipe.stem, recipe.cl.sites = "small", [3]
    train_lib.train(recipe, tmp_path / "run", show_progress=False)
    written = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert written["sites"] == [third.sites[0].to_dict()]


@pytest.mark.parametrize("sites, message", [([99], r"site 99 is not listed: the probe lists sites 1 to \d+"),
                                            ([1, 1], "sites 1 and 1 share test_resnet's tap")])
def test_a_site_number_not_listed_or_sharing_a_tap_is_one_line(sites, message):
    with pytest.raises(ClcliError, match=message) as error:
        probe.plan(["test_resnet", "test_efficientnet"], 32, stem="small", sites=sites)
    assert "\n" not in str(error.value)


def test_a_recipe_site_number_below_1_is_refused():
    from clcli import recipes

    with pytest.raises(ClcliError, match=r"'cl.sites.0' must be between 1 and 1000, got 0"):
        recipes.resolve("quickstart", overrides=["cl.sites=[0]"])


def test_a_version_1_plan_still_loads_and_trains(tmp_path):
    from clcli import train as train_lib
    from _helpers import tiny_recipe

    raw = json.loads((DATA / "plan_v1.json").read_text())  # written by clcli before issue 28 (commit 5d3f8aa)
    assert raw["version"] == 1
    plan = probe.Plan.from_dict(raw)
    assert plan.to_dict()["version"] == 1 and [t.module for t in plan.sites[0].taps] == ["layer3", "blocks.2"]
    recipe = tiny_recipe(epochs=1)
    recipe.data.train_limit, recipe.data.test_limit = 64, 32
    train_lib.train(recipe, tmp_path / "run", plan_path=str(DATA / "plan_v1.json"), show_progress=False)
    written = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert written["version"] == 1 and written["sites"][0]["taps"][0]["module"] == "layer3"


def test_an_unknown_plan_version_is_one_line():
    raw = json.loads((DATA / "plan_v1.json").read_text())
    raw["version"] = 99
    with pytest.raises(ClcliError, match="unsupported plan version 99"):
        probe.Plan.from_dict(raw)


# --- --stem small changes strides consistently ---------------------------------------------------------------------

def _register(name: str, cls, input_size=None) -> str:
    import timm
    from timm.models import register_model

    if not timm.is_model(name):
        def build(pretrained=False, **kwargs):
            net = cls(**kwargs)
            net.pretrained_cfg = {"input_size": (3, *input_size)} if input_size else {}
            return net

        build.__name__ = name
        register_model(build)
    return name


class PooledShortcut(nn.Module):
    """A stride-2 stem conv, then a block whose strided conv runs beside a pooled shortcut (DLA's tree, Xception's
    block): the pooling belongs to the block, not to the stem."""

    def __init__(self, num_classes=10, in_chans=3, **kwargs):
        super().__init__()
        self.stem = _stage(in_chans, 8, 3, 2, pad=1)
        self.body = _stage(8, 8, 3, 2, pad=1)
        self.shortcut = nn.MaxPool2d(2, 2)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.body(x) + self.shortcut(x)
        return self.head(x.mean((2, 3)))


class PoolingStem(nn.Module):
    """VGG's kind: stride-1 convs, downsampling by max-pooling alone."""

    def __init__(self, num_classes=10, in_chans=3, **kwargs):
        super().__init__()
        self.features = nn.Sequential(_stage(in_chans, 8, 3, 1, 1), nn.MaxPool2d(2, 2), _stage(8, 8, 3, 1, 1),
                                      nn.MaxPool2d(2, 2))
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class ValidStem(nn.Module):
    """Inception's kind: valid convolutions that leave nothing of a 16 px input (16 -> 7 -> 3 -> 1, then a 3x3 fails),
    made for 64 px; with the first conv at stride 1 and 'same' padding, 16 px is enough."""

    def __init__(self, num_classes=10, in_chans=3, **kwargs):
        super().__init__()
        self.stem = _stage(in_chans, 8, 3, 2)
        self.body = nn.Sequential(_stage(8, 8, 3, 2), _stage(8, 8, 3, 2), _stage(8, 8, 3, 1))
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def test_a_pooled_shortcut_is_not_taken_for_the_stem_pooling():
    m = probe.analyse(_register("clcli_test_pooled_shortcut", PooledShortcut), 32, stem="small")
    assert m.stem.conv == "stem.0" and m.stem.pool is None  # was `shortcut`: 16 + 32 px no longer added up
    assert [t.size for t in m.stage_taps] == [(32, 32), (16, 16)]  # the block's sum


def test_a_stem_that_downsamples_by_pooling_alone_loses_its_first_pooling():
    m = probe.analyse(_register("clcli_test_pooling_stem", PoolingStem), 32, stem="small")
    assert m.stem.conv is None and m.stem.pool == "features.1"
    assert {t.size for t in m.stage_taps} >= {(32, 32), (16, 16)}


def test_a_model_too_small_as_built_finds_its_stem_at_its_own_size():
    name = _register("clcli_test_valid_stem", ValidStem, input_size=(64, 64))
    with pytest.raises(ClcliError, match="fails on a 16x16 input"):
        probe.analyse(name, 16)
    m = probe.analyse(name, 16, stem="small")
    assert m.stem.conv == "stem.0" and [t.size for t in m.stage_taps][:2] == [(16, 16), (7, 7)]


def test_a_trunk_without_the_class_token_it_declares_is_a_token_grid():
    from clcli.probe._taps import _layout

    # CaiT and XCiT declare one class token but join it only after their trunk: 196 tokens are a 14 x 14 grid
    assert _layout((1, 196, 192), (224, 224), 1, None) == ("NLC", 192, 14, 14, 0)
    assert _layout((1, 197, 192), (224, 224), 1, None) == ("NLC", 192, 14, 14, 1)


def test_each_tap_has_its_place_among_timms_stages_past_the_stem():
    """0 at the end of the first feature_info stage past the stem (resnet's layer1, reduction 4), 1 at the last,
    k / (n - 1) at the end of the k-th after it, the stem's act1 (reduction 2) one step below 0, rising with depth."""
    result = probe.analyse("resnet10t", 32)
    assert [(m, r) for m, _, _, r in result.feature_stages] == \
        [("act1", 2), ("layer1", 4), ("layer2", 8), ("layer3", 16), ("layer4", 32)]
    place = {t.module: t.place for t in result.stage_taps}
    assert place == {"act1": -0.3333, "layer1": 0.0, "layer2": 0.3333, "layer3": 0.6667, "layer4": 1.0}
    places = [t.place for t in sorted(result.taps, key=lambda t: t.depth)]
    assert places == sorted(places) and places[0] == -0.6667 and places[-1] <= 1.0
    # no stem among feature_info's stages (ConvNeXt's stages.0 is at reduction 4): its first stage is 0, the
    # patchify stem before it below
    convnext = probe.analyse("test_convnext", 32)
    first = convnext.feature_stages[0]
    assert first[3] == 4 and {t.module: t.place for t in convnext.stage_taps}[first[0]] == 0.0
    assert all(t.place < 0 for t in convnext.taps if t.depth < first[2])
