"""The baselines of paper section IV-C (DML, KD, FitNets, WEL, MKB w/o CL, EL) and `clcli compare`, each checked for
the property that defines it, on two tiny timm networks and 64 shipped CIFAR-10 images."""
import json
import math

import pytest
import torch

from clcli import probe, recipes
from clcli import train as train_lib
from clcli.compare import compare
from clcli.data import QUICKSTART_DIR
from clcli.errors import ClcliError
from clcli.methods import METHODS, Batch, create
from clcli.train import build_cohort
from clcli.data import to_input
from clcli.train import param_groups

from _helpers import TINY


def _recipe(methods=("il",), epochs=1, **sections):
    return recipes.from_dict({
        "name": "tiny-methods",
        "models": list(TINY),
        "methods": list(methods),
        "input_size": 32,
        "stem": "small",
        "data": {"source": str(QUICKSTART_DIR), "train_limit": 64, "test_limit": 64, "augment": "crop_flip"},
        "train": {"epochs": epochs, "batch_size": 32, "lr": 0.05, "schedule": "cosine", "log_every": 1,
                  "threads": 1},
        **sections,
    })


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def plan():
    return probe.plan(list(TINY), 32, stem="small")


@pytest.fixture(scope="module")
def batch():
    """32 real training images, the same tensor for both networks (siamese input, as the loop gives baselines)."""
    data = train_lib.load_data(_recipe(), torch.device("cpu"))
    idx = torch.arange(32)
    raw = data.train_images[idx]
    x = to_input(raw, data.mean, data.std)
    y = data.train_labels[idx]
    return Batch([x, x], [y, y], [idx, idx], [raw, raw])


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """One tiny comparison shared by the KD, FitNets, EL and compare tests: IL, KD, FitNets (one hint epoch, one KD
    epoch) and EL, 2 seeds."""
    base = tmp_path_factory.getbasetemp()
    with pytest.MonkeyPatch.context() as mp:  # module scope runs before conftest's per-test cache isolation
        mp.setenv("CLCLI_CACHE", str(base / "cache" / "clcli"))
        out = base / "compare"
        result = compare(_recipe(epochs=2), ["il", "kd", "fitnets", "el"], 2, out, show_progress=False)
    return out, result


def _cohort(plan, name, seed=0):
    cls = METHODS[name]
    return build_cohort(plan, num_classes=10, seed=seed, with_mkb=cls.uses_mkb, shared_transfer=cls.shared_transfer)


def _networks_state(state: dict, i: int) -> dict:
    prefix = f"cohort.networks.{i}."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# --- DML -------------------------------------------------------------------------------------------------------------

def test_dml_detaches_the_peers_targets(plan, batch):
    from clcli.losses import soft_target_loss

    logits = [torch.randn(8, 10, requires_grad=True) for _ in range(3)]
    for target in ("peers", "ensemble"):
        grads = torch.autograd.grad(soft_target_loss(logits, 0, target=target, temperature=2.0), logits,
                                    allow_unused=True)
        assert grads[0] is not None and grads[0].abs().sum() > 0
        assert grads[1] is None and grads[2] is None

    method = create("dml", _cohort(plan, "dml"), _recipe())
    out = method(batch)
    assert set(out["parts"]) == {"0/cls", "0/kl", "1/cls", "1/kl"}
    expected = sum(out["parts"][f"{i}/cls"] + out["parts"][f"{i}/kl"] for i in range(2))
    assert torch.allclose(out["loss"], expected)
    # network 1's KL term gives network 0 no gradient: only its own
    net0 = list(method.cohort.networks[0].parameters())
    assert all(g is None for g in torch.autograd.grad(out["parts"]["1/kl"], net0, allow_unused=True))


# --- KD --------------------------------------------------------------------------------------------------------------

def test_kd_without_a_teacher_is_a_clear_error(tmp_path):
    with pytest.raises(ClcliError, match="train IL first"):
        train_lib.train(_recipe(methods=("kd",)), tmp_path / "kd", show_progress=False)


def test_kd_leaves_the_teacher_bit_identical_and_trains_the_student(grid):
    out, _ = grid
    il = torch.load(out / "runs/il/seed0/checkpoint.pt", weights_only=True)["method"]
    kd = torch.load(out / "runs/kd/seed0/checkpoint.pt", weights_only=True)["method"]
    teacher_il, teacher_kd = _networks_state(il, 0), _networks_state(kd, 0)
    assert teacher_il.keys() == teacher_kd.keys()
    assert all(torch.equal(teacher_il[k], teacher_kd[k]) for k in teacher_il)  # weights and BN statistics
    student_il, student_kd = _networks_state(il, 1), _networks_state(kd, 1)
    assert any(not torch.equal(student_il[k], student_kd[k]) for k in student_il)
    info_il = json.loads((out / "runs/il/seed0/run.json").read_text())
    info_kd = json.loads((out / "runs/kd/seed0/run.json").read_text())
    assert set(info_kd["test_acc"]) == set(TINY)  # both networks reported, the teacher as IL left it
    assert info_kd["test_acc"][TINY[0]] == info_il["test_acc"][TINY[0]]
    lines = [json.loads(x) for x in (out / "runs/kd/seed0/metrics.jsonl").read_text().splitlines()]
    assert "1/kd" in lines[0] and "0/kd" not in lines[0]


# --- FitNets ---------------------------------------------------------------------------------------------------------

def test_fitnets_regressor_fits_the_traced_taps_and_the_hint_loss_decreases(grid, plan, batch):
    out, _ = grid
    cohort = _cohort(plan, "fitnets")
    cohort.plan = plan
    recipe = _recipe(kd={"teacher": str(out / "runs/il/seed0")})
    method = create("fitnets", cohort, recipe)
    teacher_tap, student_tap = plan.sites[0].taps
    conv = method.regressors[0][-1]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (student_tap.channels, teacher_tap.channels,
                                                                       (1, 1))
    optimizer = torch.optim.SGD(param_groups(method, recipe), lr=0.05, momentum=0.9)
    assert {id(p) for p in method.regressors.parameters()} <= {id(p) for g in optimizer.param_groups
                                                               for p in g["params"]}
    teacher_before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    method.train()
    method.set_epoch(0)
    hints = []
    for _ in range(6):
        result = method(batch)
        hints.append(result["parts"]["1/hint"].item())
        optimizer.zero_grad(set_to_none=True)
        result["loss"].backward()
        if not hints[1:]:  # stage 1: only the layers up to the tap learn; the head and the teacher get nothing
            assert cohort.networks[1].get_classifier().weight.grad is None
            assert all(p.grad is None for p in method.teacher.parameters())
        optimizer.step()
    for i, tap in enumerate((teacher_tap, student_tap)):
        assert tuple(method.recorder[i].shape) == (32, tap.channels, tap.height, tap.width)
    assert hints[-1] < hints[0]
    assert all(torch.equal(v, method.teacher.state_dict()[k]) for k, v in teacher_before.items())
    method.set_epoch(1)  # stage 2: plain KD
    result = method(batch)
    w = recipe.kd.weight
    assert torch.allclose(result["loss"], (1 - w) * result["parts"]["1/cls"] + w * result["parts"]["1/kd"])


def test_fitnets_in_the_loop_moves_from_hints_to_kd(grid, plan):
    out, _ = grid
    state = torch.load(out / "runs/fitnets/seed0/checkpoint.pt", weights_only=True)["method"]
    assert "regressors.0.0.weight" in state  # the regressor is trained and checkpointed with the method
    init = build_cohort(plan, num_classes=10, seed=0, with_mkb=False).networks[1].get_classifier()
    head = _networks_state(state, 1)
    # the head learns only in the KD stage (epoch 2): the loop told the method the epoch
    assert not torch.equal(head["classifier.weight"], init.weight)
    lines = [json.loads(x) for x in (out / "runs/fitnets/seed0/metrics.jsonl").read_text().splitlines()]
    assert all("1/hint" in x and "1/kd" in x for x in lines if x["type"] == "step")


def test_fitnets_reads_a_hint_at_a_graph_node_by_fx_splicing(grid, plan, batch):
    import copy
    import dataclasses

    out, _ = grid
    node_plan = copy.deepcopy(plan)
    site = node_plan.sites[0]
    stage = site.taps[0].module  # the stage output the plan taps (test_resnet's layer1 .. layer3)
    # the teacher's residual `add` before its block activation: no module produces it, so no hook can read it
    (add,) = [t for t in node_plan.models[0].taps if t.module is None and t.size == site.size]
    site.taps[0] = dataclasses.replace(add)
    cohort = _cohort(node_plan, "fitnets")
    cohort.plan = node_plan
    plain = copy.deepcopy(cohort.networks[0])
    method = create("fitnets", cohort, _recipe(kd={"teacher": str(out / "runs/il/seed0")}))
    assert method.regressors[0][-1].out_channels == add.channels
    method.train()
    method.set_epoch(0)
    result = method(batch)
    assert tuple(method.recorder[0].shape) == (32, add.channels, add.height, add.width)
    result["loss"].backward()
    assert method.regressors[0][-1].weight.grad.abs().sum() > 0
    assert set(method.teacher.state_dict()) == set(plain.state_dict())  # timm's keys, nothing spliced in
    plain.load_state_dict(method.teacher.state_dict())
    seen = {}
    plain.get_submodule(stage).register_forward_hook(lambda m, a, o: seen.__setitem__("stage", o))
    with torch.no_grad():  # the capture passes the node's value on unchanged: the teacher computes what it did
        assert torch.equal(method.teacher(batch.images[0]), plain.eval()(batch.images[0]))
    assert torch.equal(torch.relu(method.recorder[0]), seen["stage"])  # the add is the stage's output before act


def test_fitnets_hint_reads_nhwc_and_token_taps_as_feature_maps():
    from clcli.methods.fitnets import regressor, to_nchw

    mixed = probe.plan(["test_vit", "test_mambaout"], 64, stem="imagenet")
    taps = mixed.sites[0].taps
    assert {t.layout for t in taps} == {"NLC", "NHWC"}
    cohort = build_cohort(mixed, num_classes=10, seed=0, with_mkb=False).eval()
    features = {}
    for i, (net, tap) in enumerate(zip(cohort.networks, taps)):
        net.get_submodule(tap.module).register_forward_hook(lambda m, a, o, i=i: features.__setitem__(i, o))
        with torch.no_grad():
            net(torch.randn(2, 3, 64, 64))
    maps = [to_nchw(features[i], tap) for i, tap in enumerate(taps)]
    for m, tap in zip(maps, taps):
        assert tuple(m.shape) == (2, tap.channels, tap.height, tap.width)
    assert regressor(taps[1], taps[0])(maps[1]).shape == maps[0].shape


# --- WEL -------------------------------------------------------------------------------------------------------------

def test_wel_regresses_embedding_distances_on_cached_w2(plan, batch):
    from clcli.losses import wasserstein2_sq

    method = create("wel", _cohort(plan, "wel"), _recipe())
    out = method(batch)
    assert set(out["parts"]) == {"0/cls", "0/wel", "1/cls", "1/wel"}
    cache = method.w2_cache
    assert (cache.misses, cache.hits) == (16, 16)  # 16 pairs (images 2k, 2k + 1) solved once, network 1 reads them
    method(batch)
    assert (cache.misses, cache.hits) == (16, 48)
    idx, raw = batch.indices[0], batch.raw[0]
    direct = wasserstein2_sq(raw[0::2], raw[1::2], grid=cache.grid)
    assert torch.allclose(cache.get(idx[0::2], idx[1::2], raw[0::2], raw[1::2]), direct)
    out["loss"].backward()
    assert all(h.weight.grad is not None and h.weight.grad.abs().sum() > 0 for h in method.heads)
    groups = param_groups(method, _recipe())
    assert {id(p) for p in method.heads.parameters()} <= {id(p) for g in groups for p in g["params"]}


def test_wel_batches_hold_pairs_fixed_for_the_run(plan):
    """The loop feeds WEL (`paired`) batches whose images 2k and 2k + 1 are partners in every epoch, so each pair's
    W2 is solved in the first epoch only (in-batch neighbours changed every epoch: a solve for the whole batch at
    every step); a batch that would split a pair across processes or micro-batches is refused in one line."""
    from types import SimpleNamespace

    from clcli.errors import ClcliError
    from clcli.train import _dist
    from clcli.train._feed import Feed

    n = 41  # odd: the last image pairs with another
    data = SimpleNamespace(train_labels=torch.zeros(n, dtype=torch.int64), class_names=[str(k) for k in range(10)],
                           train_images=torch.zeros(n, 3, 8, 8, dtype=torch.uint8), mean=(0.5,) * 3, std=(0.25,) * 3)
    recipe = _recipe()
    recipe.train.batch_size = 8
    method = create("wel", _cohort(plan, "wel"), recipe)
    feed = Feed(data, recipe, method, _dist.Dist())
    epochs = [[batch.indices[0].tolist() for batch in feed.epoch(e)] for e in (0, 1)]
    assert len(epochs[0]) == feed.steps == 21 // 4
    fixed = {frozenset(p) for p in feed.pairs.tolist()}
    assert len(fixed) == 21 and all(len(p) == 2 for p in fixed)
    pairs = [{frozenset(b[k:k + 2]) for b in batches for k in range(0, len(b), 2)} for batches in epochs]
    assert all(len(p) == 20 and p <= fixed for p in pairs) and epochs[0] != epochs[1]  # the same pairs, shuffled
    recipe.train.batch_size, recipe.train.accumulate = 6, 2  # 3 images per micro-batch: a pair split
    with pytest.raises(ClcliError, match="pairs of images that stay in one forward"):
        Feed(data, recipe, method, _dist.Dist())


# --- MKB w/o CL ------------------------------------------------------------------------------------------------------

def test_mkb_solo_has_its_own_transfers_and_no_collaborative_terms(plan, batch):
    cohort = _cohort(plan, "mkb-solo")
    out = create("mkb-solo", cohort, _recipe())(batch)
    assert set(out["parts"]) == {"0/cls", "1/cls"}
    assert torch.allclose(out["loss"], out["parts"]["0/cls"] + out["parts"]["1/cls"])
    t0, t1 = (net.mkb["site0"].transfer for net in cohort.networks)
    assert t0 is not t1
    shared = _cohort(plan, "cl")
    assert shared.networks[0].mkb["site0"].transfer is shared.networks[1].mkb["site0"].transfer


# --- CL variants beyond the paper (cl.alpha_warmup, verification_weight, gate_init, soft_*) ---------------------------

def test_cl_variants_change_the_loss_as_documented(plan, batch):
    from clcli.losses import soft_target_loss

    base = create("cl", _cohort(plan, "cl"), _recipe(methods=("cl",)))
    assert base.recipe_sections == ("cl",)
    ref = base(batch)["parts"]
    cls = ref["0/cls"] + ref["1/cls"]
    collab = sum(ref[f"{i}/metric"] + ref[f"{i}/verification"] for i in range(2))

    warm = create("cl", _cohort(plan, "cl"), _recipe(methods=("cl",), cl={"alpha_warmup": 4}))
    warm.set_epoch(0)
    assert torch.allclose(warm(batch)["loss"], cls)                    # alpha is 0 in the first epoch
    warm.set_epoch(2)
    assert torch.allclose(warm(batch)["loss"], cls + 0.1 * collab, atol=1e-5)   # half of alpha 0.2
    warm.set_epoch(9)
    assert warm.alpha == pytest.approx(0.2)

    no_ver = create("cl", _cohort(plan, "cl"), _recipe(methods=("cl",), cl={"verification_weight": 0.0}))
    assert torch.allclose(no_ver(batch)["loss"], cls + 0.2 * (ref["0/metric"] + ref["1/metric"]), atol=1e-5)

    soft = create("cl", _cohort(plan, "cl"), _recipe(methods=("cl",), cl={"soft_weight": 0.5, "temperature": 2.0}))
    out = soft(batch)
    assert set(out["parts"]) == set(ref) | {"0/soft", "1/soft"}
    expected = soft_target_loss(out["logits"], 1, target="ensemble", temperature=2.0)
    assert torch.allclose(out["parts"]["1/soft"], expected)
    assert torch.allclose(out["loss"], cls + 0.2 * collab + 0.5 * (out["parts"]["0/soft"] + out["parts"]["1/soft"]),
                          atol=1e-5)

    gates = create("cl", _cohort(plan, "cl"), _recipe(methods=("cl",), cl={"gate_init": 0.5}))
    for net in gates.cohort.networks:
        assert all(torch.all(half.decoder[-1].weight == 0.5) for half in net.mkb.values())
    assert all(torch.all(half.decoder[-1].weight == 0) for half in base.cohort.networks[0].mkb.values())
    with pytest.raises(ClcliError, match="soft_target"):
        _recipe(methods=("cl",), cl={"soft_target": "teacher"})


# --- EL --------------------------------------------------------------------------------------------------------------

class _Lookup(torch.nn.Module):
    """A toy network: the logits of sample k, where sample k is an image whose pixels all equal k."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table)

    def forward(self, x):
        return self.table[(x[:, 0, 0, 0] * 255).round().long()]


def test_el_averages_probabilities():
    from clcli.evaluation import ensemble_accuracy

    a = [[-3.0, 4.0, 4.0], [0.0, 5.0, 0.0], [5.0, 0.0, 0.0]]
    b = [[3.0, -2.0, -1.0], [0.0, 5.0, 0.0], [0.0, 0.0, 6.0]]
    labels = [0, 1, 0]

    def softmax(z):
        e = [math.exp(v) for v in z]
        return [v / sum(e) for v in e]

    by_hand = [max(range(3), key=lambda c: (softmax(a[k])[c] + softmax(b[k])[c]) / 2) for k in range(3)]
    by_logits = [max(range(3), key=lambda c: a[k][c] + b[k][c]) for k in range(3)]
    assert by_hand == [0, 1, 2] and by_logits[0] == 2  # sample 0: averaging logits would answer differently
    images = torch.arange(3, dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 3, 2, 2).contiguous()
    acc = ensemble_accuracy([_Lookup(a), _Lookup(b)], images, torch.tensor(labels), (0.0,) * 3, (1.0,) * 3)
    assert acc == pytest.approx(100.0 * sum(p == y for p, y in zip(by_hand, labels)) / 3)


def test_el_is_not_trained_but_computed_from_the_il_runs(grid, tmp_path):
    from clcli.compare import el_accuracy

    with pytest.raises(ClcliError, match="clcli compare"):
        train_lib.train(_recipe(methods=("el",)), tmp_path / "el")
    assert not (tmp_path / "el").exists()
    out, _ = grid
    saved = json.loads((out / "runs/el/seed0.json").read_text())
    assert el_accuracy(out / "runs/il/seed0") == saved["test_acc"]


# --- compare ---------------------------------------------------------------------------------------------------------

def test_compare_writes_the_table_and_reuses_finished_runs(grid):
    out, result = grid
    table = (out / "table.md").read_text()
    for label in ("| IL |", "| EL |", "| DL (1→2) |", "| HL (1→2) |", "IL's final accuracy"):
        assert label in table
    assert [label for label, _ in result["rows"]] == ["IL", "EL", "DL (1→2)", "HL (1→2)"]
    assert "The paper's labels as clcli methods: DL (1→2) = `kd`, HL (1→2) = `fitnets`." in table
    assert result["label_note"] == "the paper's labels as clcli methods: DL (1→2) = kd, HL (1→2) = fitnets"
    assert "dataset quickstart (a local folder)" in table and str(QUICKSTART_DIR) not in table  # no machine path
    assert " / " in result["rows"][0][1] and "±" in result["rows"][0][1] and " / " not in result["rows"][1][1]
    lines = (out / "results.csv").read_text().splitlines()
    assert lines[0] == "method,seed,network,test_acc,iterations,reach_il_iteration"
    assert len(lines) == 1 + 3 * 2 * 2 + 2  # (il, kd, fitnets) x 2 seeds x 2 networks, then EL per seed
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = sorted((out / "runs").glob("*/seed*/run.json"))
    assert len(runs) == 6
    stamps = {p: (p.stat().st_mtime_ns, (p.parent / "checkpoint.pt").stat().st_mtime_ns) for p in runs}
    again = compare(_recipe(epochs=2), ["il", "kd", "fitnets", "el"], 2, out, show_progress=False)
    assert {p: (p.stat().st_mtime_ns, (p.parent / "checkpoint.pt").stat().st_mtime_ns) for p in runs} == stamps
    assert again["rows"] == result["rows"]
    # an unfinished run is resumed in its folder (here from nothing: its checkpoint is gone); the others stay
    unfinished = out / "runs/kd/seed1/run.json"
    info = json.loads(unfinished.read_text())
    unfinished.write_text(json.dumps({**info, "status": "interrupted"}))
    (unfinished.parent / "checkpoint.pt").unlink()
    resumed = compare(_recipe(epochs=2), ["il", "kd", "fitnets", "el"], 2, out, show_progress=False)
    assert json.loads(unfinished.read_text())["status"] == "finished"
    assert {p: s for p, s in stamps.items() if p != unfinished} == {
        p: (p.stat().st_mtime_ns, (p.parent / "checkpoint.pt").stat().st_mtime_ns) for p in runs if p != unfinished}
    assert resumed["rows"] == result["rows"]  # the same recipe and seed train the same weights
    with pytest.raises(ClcliError, match="train.epochs"):
        compare(_recipe(epochs=3), ["il"], 1, out, show_progress=False)


def test_compare_reuses_runs_whose_own_sections_are_unchanged(grid):
    """A CL variant (cl.*) or a DML setting leaves the IL and KD runs valid; a change to kd.* does not."""
    out, result = grid
    runs = sorted((out / "runs").glob("*/seed*/run.json"))
    stamps = {p: p.stat().st_mtime_ns for p in runs}
    again = compare(_recipe(epochs=2, cl={"alpha": 0.7}, dml={"weight": 2.0}), ["il", "kd", "el"], 2, out,
                    show_progress=False)
    assert {p: p.stat().st_mtime_ns for p in runs} == stamps
    assert again["rows"][:3] == result["rows"][:3]
    with pytest.raises(ClcliError, match="kd.temperature"):
        compare(_recipe(epochs=2, kd={"temperature": 2.0}), ["il", "kd"], 2, out, show_progress=False)


def test_compare_cli_writes_to_reports_by_default_and_reuses_runs(grid, tmp_path, monkeypatch):
    import shutil

    import yaml
    from typer.testing import CliRunner

    from clcli.cli import app

    out, result = grid
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(_recipe(epochs=2).to_dict()))
    shutil.copytree(out / "runs", tmp_path / "reports" / "tiny-methods" / "runs")
    stamp = (tmp_path / "reports/tiny-methods/runs/il/seed0/checkpoint.pt").stat().st_mtime_ns
    invoked = CliRunner().invoke(app, ["compare", "--recipe", "tiny.yaml", "--methods", "il,el", "--seeds", "2",
                                       "--no-progress"])
    assert invoked.exit_code == 0, invoked.output
    assert (tmp_path / "reports/tiny-methods/table.md").is_file()
    assert (tmp_path / "reports/tiny-methods/runs/il/seed0/checkpoint.pt").stat().st_mtime_ns == stamp  # reused
    assert result["rows"][0][1] in invoked.stdout  # the IL cell, as the library computed it
