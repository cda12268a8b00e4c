"""The training core as timm's train.py has it, through timm's own factories: optimisers with weight-decay and
layer-decay groups, schedules, label smoothing and mixup/cutmix as soft targets, EMA weights (with their own MKB
halves), gradient clipping, best epoch and early stopping, model_kwargs; resumed bit-exactly."""
import copy
import json
import pytest
import torch
from typer.testing import CliRunner

from clcli import recipes
from clcli import train as train_lib
from clcli.cli import app
from clcli.errors import ClcliError

from _helpers import cli, straight_and_killed, tiny_args, tiny_recipe

runner = CliRunner()

# Every option of the training core at once (the CLI's --set form); one tiny run trains with all of them.
EVERYTHING = ["train.opt=adamw", "train.lr=0.002", "train.weight_decay=0.05", "train.filter_bias_and_bn=true",
              "train.warmup_epochs=1", "train.warmup_lr=0.0001", "train.min_lr=0.00001", "train.label_smoothing=0.1",
              "train.mixup=0.8", "train.cutmix=1.0", "train.mixup_switch_prob=0.5", "train.ema_decay=0.9",
              "train.ema_warmup=true", "train.clip_grad=1.0", "train.keep_best=true", "train.patience=5",
              "model_kwargs.drop_path_rate=0.1", "data.auto_augment=rand-m9-n2-mstd0.5", "data.re_prob=0.25"]


def _sets(pairs):
    return [x for p in pairs for x in ("--set", p)]


def _recipe(**train):
    r = tiny_recipe(epochs=2)
    for k, v in train.items():
        setattr(r.train, k, v)
    return r


def test_every_option_at_once_resumes_bit_exactly_after_sigkill(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = lambda out: tiny_args(out, epochs=3) + _sets(EVERYTHING)  # noqa: E731
    # 256 images less the 10 % held out for keep_best / batch 32 = 7 steps an epoch: die inside the second epoch
    a, b = straight_and_killed(args, straight, killed, kill_at_step=10)
    for part in ("method", "optimizer", "scheduler", "ema", "best"):
        assert part in a, part
    flat = lambda state: dict(_flatten(state))  # noqa: E731
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        if torch.is_tensor(fa[k]):
            assert torch.equal(fa[k], fb[k]), k
        else:
            assert fa[k] == fb[k], k
    info = json.loads((straight / "run.json").read_text())
    assert set(info["ema_test_acc"]) == set(info["test_acc"]) and set(info["best"]) == set(info["test_acc"])
    plan = json.loads((straight / "plan.json").read_text())
    assert all(m["kwargs"]["drop_path_rate"] == 0.1 for m in plan["models"])


def _flatten(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}{k}.")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flatten(v, f"{prefix}{i}.")
    else:
        yield prefix, obj


def _cl_method(recipe):
    from clcli import methods
    from clcli.cohort import build_cohort
    from clcli.data import load_data
    from clcli.train._plan import plan_for

    data = load_data(recipe, torch.device("cpu"))
    plan = plan_for(recipe, len(data.class_names))
    cohort = build_cohort(plan, num_classes=len(data.class_names), seed=0, with_mkb=True)
    return methods.create("cl", cohort, recipe), data


def _first_batch(recipe, method, data):
    from clcli.train._dist import current
    from clcli.train._feed import Feed

    return next(iter(Feed(data, recipe, method, current()).epoch(0)))


def test_mixup_targets_reach_the_classification_and_verification_losses():
    recipe = _recipe(mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    method, data = _cl_method(recipe)
    batch = _first_batch(recipe, method, data)
    assert batch.targets[0].shape == (32, 10) and batch.targets[0].dtype.is_floating_point
    assert torch.allclose(batch.targets[0].sum(1), torch.ones(32))
    again = _first_batch(recipe, method, data)  # the same (seed, epoch, step): the same mix
    assert torch.equal(batch.images[0], again.images[0]) and torch.equal(batch.targets[0], again.targets[0])

    def grads(targets):
        method.zero_grad()
        out = method(type(batch)(batch.images, targets, batch.indices, batch.raw))
        for part in ("0/cls", "0/verification"):
            out["parts"][part].backward(retain_graph=True)
        return {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}

    soft = grads(batch.targets)
    hard = grads([t.argmax(1) for t in batch.targets])
    verifier = [n for n in soft if n.startswith("cohort.verifiers.")]
    assert verifier, "the verification head got no gradient"
    assert any(not torch.allclose(soft[n], hard[n]) for n in verifier)
    classifier = [n for n in soft if n.startswith("cohort.networks.0.") and "fc" in n]
    assert classifier and any(not torch.allclose(soft[n], hard[n]) for n in classifier)


def test_the_mix_depends_on_seed_epoch_and_step_only():
    from clcli.train._targets import TargetMixer

    cfg = _recipe(mixup=1.0, cutmix=1.0).train
    images, labels = torch.randn(8, 3, 4, 4), torch.arange(8) % 10
    mixer = TargetMixer(cfg, 10)
    a = mixer(images.clone(), labels, epoch=1, step=3)
    torch.manual_seed(123)  # nothing else's random state matters
    b = mixer(images.clone(), labels, epoch=1, step=3)
    c = mixer(images.clone(), labels, epoch=1, step=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1]) or not torch.equal(a[0], c[0])


def test_mixup_is_refused_where_it_is_not_defined():
    with pytest.raises(ClcliError, match="cl.input=different"):
        recipes.resolve(overrides=["train.mixup=0.8", "cl.input=different"])
    with pytest.raises(ClcliError, match="wel"):
        recipes.resolve(overrides=["train.mixup=0.8", "methods=[il, wel]"])
    with pytest.raises(ClcliError, match="even"):
        recipes.resolve(overrides=["train.cutmix=1.0", "train.batch_size=33"])
    with pytest.raises(ClcliError, match="keep_best"):
        recipes.resolve(overrides=["train.patience=3"])


def test_the_ema_export_equals_the_runs_ema_evaluation_and_a_live_hooked_copy_does_not(tmp_path):
    from clcli.data import load_data
    from clcli.evaluation import evaluate
    from clcli.export import export_run, load
    from clcli.run import Run

    recipe = tiny_recipe(epochs=2)
    recipe.train.ema_decay = 0.5
    out = tmp_path / "run"
    summary = train_lib.train(recipe, out, show_progress=False)["cl"]
    export_run(out, tmp_path / "ema", weights="ema")
    data = load_data(recipe, torch.device("cpu"))
    for name, acc in summary["ema_test_acc"].items():
        net = load(tmp_path / "ema" / f"{name}.safetensors")
        assert evaluate(net, data.test_images, data.test_labels, data.mean, data.std)["top1"] == acc
    # The pitfall: a copy whose fusion hooks still run the live MKB half is another network.
    run = Run.open(out)
    live, averaged = run.cohort("last"), run.cohort("ema")
    x = torch.randn(4, 3, 32, 32)
    for net_live, net_ema in zip(live.networks, averaged.networks):
        own = net_ema(x)
        wrong = copy.deepcopy(net_ema)
        site, half = next(iter(wrong.mkb.items()))
        fusion = [(m, k) for m in wrong.modules() for k, h in m._forward_hooks.items()
                  if getattr(h, "__self__", None) is half]
        assert fusion, "no MKB fusion hook found"
        module, key = fusion[0]
        module._forward_hooks[key] = net_live.mkb[site].fusion_hook  # the same site's live half, as a closure
        assert not torch.allclose(wrong(x), own)
        assert torch.allclose(copy.deepcopy(net_ema)(x), own)  # a deep copy fuses its own half


def test_adamw_with_layer_decay_gives_timms_groups_plus_the_mkb_group():
    from timm.optim import param_groups_layer_decay

    from clcli.train import param_groups
    from clcli.train._optim import Optimisation

    recipe = tiny_recipe(models=["test_vit", "test_resnet"], epochs=1)
    recipe.stem = "imagenet"
    recipe.train.opt, recipe.train.layer_decay, recipe.train.weight_decay = "adamw", 0.75, 0.05
    recipe.train.filter_bias_and_bn = True
    method, _ = _cl_method(recipe)
    vit = method.cohort.networks[0]
    groups = param_groups(method, recipe)
    mine = [g for g in groups if g["name"] == method.cohort.labels[0]]
    no_mkb = {id(p) for n, p in vit.named_parameters() if n.startswith("mkb.")}
    theirs = [g for g in param_groups_layer_decay(vit, weight_decay=0.05, layer_decay=0.75,
                                                   no_weight_decay_list=vit.no_weight_decay())
              if any(id(p) not in no_mkb for p in g["params"])]
    assert len(mine) == len(theirs)
    for g, t in zip(mine, theirs):
        assert (g["lr_scale"], g["weight_decay"]) == (t["lr_scale"], t["weight_decay"])
        assert [id(p) for p in g["params"]] == [id(p) for p in t["params"] if id(p) not in no_mkb]
    shared = [g for g in groups if g["name"] == "shared"]
    assert len(shared) == 1 and "lr_scale" not in shared[0]
    mkb_params = {id(p) for net in method.cohort.networks for n, p in net.named_parameters() if n.startswith("mkb.")}
    assert mkb_params <= {id(p) for p in shared[0]["params"]}
    assert {id(p) for p in method.cohort.verifiers.parameters()} <= {id(p) for p in shared[0]["params"]}
    opt = Optimisation(method, recipe, 4, torch.device("cpu")).optimizer
    assert type(opt).__name__ == "AdamW"


def test_gradient_clipping_is_per_network():
    from clcli.train._optim import Optimisation

    recipe = tiny_recipe(epochs=1)
    recipe.train.clip_grad = 1.0
    method, _ = _cl_method(recipe)
    optimisation = Optimisation(method, recipe, 4, torch.device("cpu"))
    small, large = method.cohort.networks
    for p in method.parameters():
        p.grad = torch.full_like(p, 1e-6)
    for p in large.parameters():
        p.grad = torch.full_like(p, 10.0)
    before = [p.grad.clone() for p in small.parameters() if not _is_mkb(small, p)]
    optimisation.clip()
    after = [p.grad for p in small.parameters() if not _is_mkb(small, p)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # untouched by the other network's norm
    own = [p for n, p in large.named_parameters() if not n.startswith("mkb.")]
    assert torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in own])) <= 1.0 + 1e-4


def _is_mkb(net, param):
    return any(param is p for n, p in net.named_parameters() if n.startswith("mkb."))


def test_schedules_come_from_timm_and_plateau_watches_accuracy():
    from clcli.train._optim import create_scheduler

    net = torch.nn.Linear(2, 2)
    cfg = _recipe(schedule="cosine", warmup_epochs=1, warmup_lr=0.001, epochs=4).train
    cfg.epochs = 4
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = create_scheduler(opt, cfg, steps_per_epoch=10)
    lrs = []
    for step in range(40):
        sched.step_update(num_updates=step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.001)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # one epoch of linear warm-up, per update
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.01  # then cosine decay
    cfg.schedule, cfg.warmup_epochs, cfg.plateau_patience = "plateau", 0, 0
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = create_scheduler(opt, cfg, steps_per_epoch=10)
    for epoch, acc in enumerate([50.0, 60.0, 70.0]):  # accuracy rising: no decay
        sched.step(epoch + 1, acc)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    sched.step(4, 65.0)  # fell: decayed (patience 0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)


def test_keep_best_selects_on_held_out_training_images_and_exports_them(tmp_path):
    recipe = tiny_recipe(epochs=3)
    recipe.train.keep_best = True
    out = tmp_path / "run"
    summary = train_lib.train(recipe, out, show_progress=False)["cl"]
    info = json.loads((out / "run.json").read_text())
    assert info["data"]["train_images"] < 256  # the validation part came out of the training images
    assert info["data"]["eval_images"] == 200  # the reported evaluation is still the test split
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["type"] == "epoch"]
    for name, best in summary["best"].items():
        vals = [r["val_acc"][name] for r in epochs]
        assert best["val_acc"] == pytest.approx(max(vals), abs=1e-3)
        assert best["epoch"] == vals.index(max(vals)) + 1
        assert best["test_acc"] == pytest.approx(epochs[best["epoch"] - 1]["test_acc"][name], abs=1e-3)
    result = runner.invoke(app, ["export", str(out), "--best", "--out", str(tmp_path / "best")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "best" / "manifest.json").read_text())
    for entry in manifest["networks"]:
        assert entry["weights"] == "best"
        assert entry["test_acc"] == pytest.approx(summary["best"][entry["network"]]["test_acc"], abs=1e-3)
    refused = runner.invoke(app, ["export", str(out), "--ema", "--out", str(tmp_path / "ema")])
    assert isinstance(refused.exception, ClcliError) and "ema_decay" in str(refused.exception)


def test_cli_and_python_api_take_the_options(tmp_path):
    r = recipes.resolve(overrides=["train.opt=lion", "train.opt_betas=[0.9, 0.99]", "train.schedule=multistep",
                                   "train.decay_milestones=[1]", "model_kwargs.drop_rate=0.2"])
    assert (r.train.opt, r.train.opt_betas, r.train.decay_milestones, r.model_kwargs) == (
        "lion", [0.9, 0.99], [1], {"drop_rate": 0.2})
    bad = cli(["train", "--set", "train.opt=nosuchopt", "--out", str(tmp_path / "x")])
    assert bad.returncode == 2 and "train.opt" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    clipped = runner.invoke(app, tiny_args(tmp_path / "clip", epochs=1)
                            + _sets(["train.opt=sgd", "train.clip_grad=0.5", "train.clip_mode=agc",
                                     "train.schedule=step", "train.label_smoothing=0.2"]))
    assert clipped.exit_code == 0, clipped.output
