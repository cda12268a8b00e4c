import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from clcli import train as train_lib
from clcli.cli import app
from clcli.errors import ClcliError

from _helpers import straight_and_killed, tiny_args, tiny_recipe

runner = CliRunner()


def test_cl_run_writes_a_complete_run_folder(tmp_path):
    out = tmp_path / "run"
    results = train_lib.train(tiny_recipe(), out, show_progress=False)
    assert set(results) == {"cl"}
    for name in ("recipe.yaml", "plan.json", "run.json", "metrics.jsonl", "checkpoint.pt"):
        assert (out / name).is_file(), name
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["class_names"][0] == "airplane"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x["type"] == "step"]
    epochs = [x for x in lines if x["type"] == "epoch"]
    assert len(epochs) == 2
    assert {"0/cls", "0/metric", "0/verification", "1/cls", "lr", "images_per_s"} <= set(steps[0])
    assert set(epochs[-1]["test_acc"]) == {"test_resnet", "test_efficientnet"}
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2


def test_training_learns_something_on_real_images(tmp_path):
    results = train_lib.train(tiny_recipe(methods=("il",), epochs=3), tmp_path / "run", show_progress=False)
    # 10 classes: chance is 10 %; three tiny epochs on 256 real images get clearly above it for one network
    assert max(results["il"]["test_acc"].values()) > 14.0


def test_il_and_cl_start_from_the_same_networks(tmp_path):
    from clcli import probe
    from clcli.train import build_cohort

    plan = probe.plan(["test_resnet", "test_efficientnet"], 32, stem="small")
    a = build_cohort(plan, num_classes=10, seed=5, with_mkb=False)
    b = build_cohort(plan, num_classes=10, seed=5, with_mkb=True)
    sa, sb = a.state_dict(), b.state_dict()
    for k, v in sa.items():
        assert torch.equal(v, sb[k]), k


def test_existing_run_folder_is_never_overwritten_without_force(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ClcliError, match="already exists"):
        train_lib.train(tiny_recipe(), out, show_progress=False)
    assert (out / "mine.txt").read_text() == "keep me"


def test_an_existing_out_is_refused_whatever_the_methods_and_force_replaces_only_a_run(tmp_path, monkeypatch):
    """A two-method recipe writes il/ and cl/ inside --out: into an existing single-method run folder that would mix
    two runs in one folder."""
    from clcli.train import _run

    prepared = []
    monkeypatch.setattr(_run, "_train_prepared", lambda recipe, runs, *rest: prepared.append(runs) or {})
    single = tmp_path / "single"
    single.mkdir()
    (single / "run.json").write_text("{}")
    (single / "checkpoint.pt").write_text("an earlier run's weights")
    with pytest.raises(ClcliError, match=f"{single} already exists; use --resume to continue it or --force"):
        train_lib.train(tiny_recipe(methods=("il", "cl")), single, show_progress=False)
    assert sorted(p.name for p in single.iterdir()) == ["checkpoint.pt", "run.json"] and not prepared
    train_lib.train(tiny_recipe(methods=("il", "cl")), single, force=True, show_progress=False)
    assert sorted(p.name for p in single.iterdir()) == ["cl", "il"]  # the earlier run replaced, not joined
    assert [[d.name for _, d in runs] for runs in prepared] == [["il", "cl"]]
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_text("not a run")
    with pytest.raises(ClcliError, match="--force replaces run folders only"):
        train_lib.train(tiny_recipe(), other, force=True, show_progress=False)
    assert (other / "cat.jpg").read_text() == "not a run"


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    train_lib.train(tiny_recipe(epochs=1), out, show_progress=False)
    before = (out / "checkpoint.pt").read_bytes()
    recipe = tiny_recipe(epochs=2)
    recipe.train.lr = 1e30  # diverges at once
    out2 = tmp_path / "run2"
    with pytest.raises(ClcliError, match="non-finite loss.*no checkpoint was written"):
        train_lib.train(recipe, out2, show_progress=False)
    assert not out2.exists()  # failed before its first checkpoint: nothing to resume or export is left behind
    assert (out / "checkpoint.pt").read_bytes() == before


def test_iterative_and_different_input_modes_run(tmp_path):
    r = train_lib.train(tiny_recipe(epochs=1, manner="iterative"), tmp_path / "it", show_progress=False)
    assert set(r["cl"]["test_acc"]) == {"test_resnet", "test_efficientnet"}
    r = train_lib.train(tiny_recipe(epochs=1, input="different"), tmp_path / "diff", show_progress=False)
    lines = [json.loads(x) for x in (tmp_path / "diff" / "metrics.jsonl").read_text().splitlines()]
    assert all(x["0/metric"] >= 0 for x in lines if x["type"] == "step")


def test_plan_file_from_probe_drives_training(tmp_path):
    result = runner.invoke(app, ["probe", "test_resnet", "test_efficientnet", "--stem", "small", "--mkbs", "2",
                                 "--json"])
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(result.stdout)
    out = tmp_path / "run"
    train_lib.train(tiny_recipe(epochs=1), out, plan_path=str(plan_file), show_progress=False)
    assert len(json.loads((out / "plan.json").read_text())["sites"]) == 2


def test_the_plan_decides_models_input_size_and_stem(tmp_path):
    result = runner.invoke(app, ["probe", "test_efficientnet", "test_resnet", "--input-size", "48", "--json"])
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(result.stdout)
    args = tiny_args(tmp_path / "run", epochs=1)  # recipe: test_resnet + test_efficientnet, 32 px, small stem
    trained = runner.invoke(app, [*args, "--plan", str(plan_file)])
    assert trained.exit_code == 0, trained.output
    assert "decides: models" in trained.stdout and "input_size 32 -> 48" in trained.stdout
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["models"] == ["test_efficientnet", "test_resnet"] and info["input_size"] == [48, 48]
    recipe = (tmp_path / "run" / "recipe.yaml").read_text()
    assert "input_size: 48" in recipe and "stem: imagenet" in recipe
    for bad, message in [("[1, 2]", "must hold a mapping, it is a list"), ('{"version": 1, "models": 3}', "malformed clcli plan")]:
        plan_file.write_text(bad)
        failed = runner.invoke(app, [*args, "--plan", str(plan_file), "--force"])
        assert isinstance(failed.exception, ClcliError) and message in str(failed.exception)


def _cli(args, env=None):
    return subprocess.run([sys.executable, "-m", "clcli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_sigkill_and_resume_ends_with_the_same_weights(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # 256 images / batch 32 = 8 steps an epoch: die in the middle of the second epoch
    a, b = (c["method"] for c in straight_and_killed(tiny_args, straight, killed, kill_at_step=11))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (straight / "metrics.jsonl").read_text().count('"epoch"') == (killed / "metrics.jsonl").read_text().count('"epoch"')


def test_cli_errors_are_one_line_exit_2(tmp_path):
    for args, message in [
        (["train", "--recipe", "nope"], "unknown recipe"),
        (["train", "--set", "train.epochz=1"], "unknown key 'train.epochz'"),
        (["train", "--models", "resnet_nope", "test_resnet", "--out", str(tmp_path / "x")], "unknown model"),
        (["train", "--method", "zzz", "--out", str(tmp_path / "y")], "unknown method"),
        (["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "z")], "missing"),
        (["train", "--resume", str(tmp_path)], "not a clcli run folder"),
    ]:
        r = _cli([*args, "--no-progress"] if args[1] != "--resume" else args)
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_different_inputs_pair_images_the_same_way_every_epoch_so_w2_is_cached(tmp_path):
    from clcli import methods
    from clcli.train import load_data, resolve_device
    from clcli.train import fit

    recipe = tiny_recipe(epochs=2, input="different")
    recipe.data.train_limit = 64
    device = resolve_device("cpu")
    data = load_data(recipe, device)
    from clcli import probe
    from clcli.train import build_cohort

    plan = probe.plan(recipe.models, 32, stem="small", mkbs=1)  # one MKB: one look-up a pair a step
    method = methods.create("cl", build_cohort(plan, num_classes=10, seed=0, with_mkb=True), recipe)
    (tmp_path / "run").mkdir()
    fit(method, data, recipe, tmp_path / "run", show_progress=False)
    cache = method.w2_cache
    # 2 epochs x 64 pairs, each looked up once a step (the summed metric loss evaluates a pair once for both
    # networks' terms): only the first look-up of each distinct pair in epoch 1 solves it (fewer than 64 when a
    # pair shows up both ways); every look-up of epoch 2 is a hit
    assert cache.hits + cache.misses == 2 * 64 and cache.misses <= 64 and cache.hits >= 64


def test_mnist_recipe_trains_any_timm_model_on_grayscale(tmp_path):
    from pathlib import Path

    from clcli import recipes

    mnist = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
    if not mnist.is_dir():  # the real MNIST copy beside the checkout (../shared/data); not shipped in the repo
        pytest.skip(f"no real MNIST at {mnist}")
    recipe = recipes.load("mnist", [f"data.source={mnist}", "data.train_limit=64", "data.test_limit=32",
                                    "models=[test_resnet, test_efficientnet]", "train.epochs=1",
                                    "train.batch_size=32", "train.threads=2"])
    results = train_lib.train(recipe, tmp_path / "run", show_progress=False)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["class_names"] == [str(d) for d in range(10)] and info["mean"] == [0.0]
    assert set(results["cl"]["test_acc"]) == {"test_resnet", "test_efficientnet"}


def test_evaluation_builds_no_autograd_graph():
    import timm

    from clcli.train import evaluate

    net = timm.create_model("test_resnet", num_classes=10)
    grad_enabled = []
    net.register_forward_hook(lambda m, i, o: grad_enabled.append(torch.is_grad_enabled() or o.requires_grad))
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    evaluate(net, images, torch.zeros(4, dtype=torch.int64), (0.5,) * 3, (0.25,) * 3)
    assert grad_enabled == [False]


def test_the_progress_rate_never_reads_zero_on_a_slow_run():
    from clcli.train._display import images_per_second

    assert [images_per_second(r) for r in (0.004123, 0.4123, 5.55, 87.53, 1234.5)] == \
        ["0.00412", "0.412", "5.55", "87.5", "1,234"]


def test_the_progress_shows_one_line_per_network():
    import io

    from rich.console import Console

    from clcli.train._display import LiveProgress

    buffer = io.StringIO()
    progress = LiveProgress(True, 10, "cl a+b", Console(file=buffer, width=100, color_system=None))
    progress.update(5, "epoch 1/2  0.412 img/s", [("resnet10t", {"cls": 1.5, "metric": 0.25, "verification": 2.0},
                                                     40.0), ("mobilenetv3_small_050", {"cls": 2.0}, 30.0)])
    progress.stop()
    lines = buffer.getvalue().splitlines()
    assert any(line.strip().startswith("resnet10t") and "verification 2.000" in line for line in lines)
    assert any(line.strip().startswith("mobilenetv3_small_050") and "cls 2.000" in line for line in lines)


def test_the_progress_counts_every_step_between_log_windows(tmp_path, monkeypatch):
    """The bar's step count and ETA move every step, not only at the log windows (a slow step would show
    0/N and no ETA for log_every steps)."""
    import io

    from rich.console import Console
    from rich.progress import Progress

    shown = []
    update = Progress.update
    monkeypatch.setattr(Progress, "update", lambda self, task, **kw: shown.append(kw.get("completed"))
                        or update(self, task, **kw))
    recipe = tiny_recipe(methods=("il",), epochs=1)
    recipe.data.train_limit, recipe.data.test_limit, recipe.train.batch_size = 64, 16, 16  # 4 steps
    recipe.train.log_every = 100
    train_lib.train(recipe, tmp_path / "run", console=Console(file=io.StringIO(), width=100))
    assert [c for c in shown if c is not None] == [1, 2, 3, 4]


def test_a_distance_registered_in_python_trains_from_a_recipe(tmp_path):
    from clcli import losses, recipes

    calls = []

    @losses.register_metric("half_l2", symmetric=True)
    def half_l2(a, b):
        calls.append(a.shape)
        return 0.5 * losses.METRICS["l2"](a, b)

    try:
        path = tmp_path / "half.yaml"
        path.write_text("models: [test_resnet, test_efficientnet]\nmethods: [cl]\ncl: {metric: half_l2}\n"
                        "data: {source: 'builtin:quickstart', train_limit: 64, test_limit: 64}\n"
                        "train: {epochs: 1, batch_size: 32, log_every: 1, threads: 2}\n")
        train_lib.train(recipes.load(str(path)), tmp_path / "run", show_progress=False)
        steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert calls and steps[0]["0/metric"] > 0  # the registered distance is what the metric loss computed
        assert json.loads((tmp_path / "run" / "plan.json").read_text())["fuse"] == "mul"  # fusion kept with the plan
    finally:
        losses.METRICS.pop("half_l2")
        losses.SYMMETRIC.discard("half_l2")
    with pytest.raises(ClcliError, match="'cl.metric' must be one of"):
        recipes.load(str(path))
