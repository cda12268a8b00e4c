"""Experiment trackers (train.log / --log) and per-class results: what TensorBoard, W&B (offline) and MLflow (a
local file store) hold, read back through their own readers, is what metrics.jsonl holds, also across a SIGKILL and
--resume; a missing extra is one line; the confusion matrix is a hand count."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from clcli import evaluation, recipes, tracking
from clcli.cli import app
from clcli.run import read_metrics

from _helpers import TINY, tiny_args, tiny_recipe

runner = CliRunner()
LABELS = TINY  # two different models: their labels are their names


def expected_scalars(record: dict) -> dict[str, float]:
    """What a tracker must hold for one metrics.jsonl record, written out here apart from clcli.tracking: per-network
    keys `<index>/<part>` under the network's label, per-network mappings as `<label>/<key>`, the rest as it is; an
    epoch record's `epoch` and `lr` are the step record's of the same step."""
    out = {}
    for key, value in record.items():
        if key in ("type", "step") or (record["type"] == "epoch" and key in ("epoch", "lr")):
            continue
        if isinstance(value, dict):
            out.update({f"{label}/{key}": v for label, v in value.items()})
        elif "/" in key:
            index, part = key.split("/")
            out[f"{LABELS[int(index)]}/{part}"] = value
        else:
            out[key] = value
    return out


def expected_history(run_dir: Path) -> dict[tuple[str, int], float]:
    history = {}
    for record in read_metrics(run_dir):
        for name, value in expected_scalars(record).items():
            assert (name, record["step"]) not in history, (name, record["step"])
            history[name, record["step"]] = float(value)
    return history


def tensorboard_history(run_dir: Path) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    history = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            assert (tag, event.step) not in history, f"{tag} logged twice at step {event.step}"
            history[tag, event.step] = event.value
    return history


def wandb_history(run_dir: Path) -> tuple[set[str], dict[tuple[str, int], float]]:
    """The run ids and the logged history of every offline W&B session under the run folder (W&B's own reader of
    its transaction log, `wandb leet inspect --json`)."""
    ids, history = set(), {}
    wandb_cli = Path(sys.executable).with_name("wandb")
    for session in sorted((run_dir / "wandb").glob("offline-run-*")):
        out = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(session)], capture_output=True,
                             text=True, check=True).stdout
        for line in out.splitlines():
            record = json.loads(line)
            if record["type"] == "run":
                ids.add(record["run"]["run_id"])
            if record["type"] == "history":
                item = record["history"]["item"]
                for name, value in item.items():  # clcli's step is a metric, the x-axis of the others
                    if not name.startswith("_") and name != "step":
                        assert (name, item["step"]) not in history, f"{name} logged twice at step {item['step']}"
                        history[name, item["step"]] = value
    return ids, history


def mlflow_history(store: Path) -> tuple[list, dict[str, dict[tuple[str, int], float]]]:
    """The runs of the local store and each run's logged history, by run id (MLflow's client)."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.as_uri())
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    histories = {}
    for run in runs:
        history = histories[run.info.run_id] = {}
        for name in run.data.metrics:
            for m in client.get_metric_history(run.info.run_id, name):
                assert (name, m.step) not in history, f"{name} logged twice at step {m.step}"
                history[name, m.step] = m.value
    return runs, histories


def assert_same(logged: dict, expected: dict, measured_again=()) -> None:
    """`measured_again`: steps the tracker kept from before a kill while the resumed run logged them anew: a
    resumed run recomputes every value exactly, except the speed (images_per_s), a measurement."""
    assert set(logged) == set(expected), (sorted(set(expected) - set(logged))[:5],
                                          sorted(set(logged) - set(expected))[:5])
    for (name, step), value in expected.items():
        if name == "images_per_s" and step in measured_again:
            continue
        assert logged[name, step] == pytest.approx(value, rel=1e-6, abs=1e-6), (name, step)  # TensorBoard: float32


def test_tensorboard_holds_metrics_jsonl_and_per_class_results_add_up(tmp_path):
    pytest.importorskip("tensorboard")
    from clcli import train

    recipe = tiny_recipe(epochs=2)
    recipe.train.log = ["tensorboard"]
    train.train(recipe, tmp_path / "run", show_progress=False)
    run = tmp_path / "run"
    expected = expected_history(run)
    assert ("test_resnet/cls", 4) in expected and ("test_efficientnet/test_acc", 16) in expected
    assert_same(tensorboard_history(run), expected)

    info = json.loads((run / "run.json").read_text())
    counts = [0] * len(info["class_names"])
    from clcli.data import load_data

    for label in load_data(recipe, torch.device("cpu")).test_labels.tolist():
        counts[label] += 1
    for name in LABELS:
        confusion = info["per_class"][name]["confusion"]
        assert [sum(row) for row in confusion] == counts  # rows: the true classes
        right = sum(confusion[k][k] for k in range(len(counts)))
        assert 100 * right / sum(counts) == pytest.approx(info["test_acc"][name])
    # the exported network measured on its own gives the same matrix
    assert runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "ex"), "--no-measure"]).exit_code == 0
    result = runner.invoke(app, ["eval", str(tmp_path / "ex" / "test_resnet.safetensors"), "--json"])
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.output)
    assert evaluated["confusion"] == info["per_class"]["test_resnet"]["confusion"]
    assert evaluated["per_class"] == pytest.approx(info["per_class"]["test_resnet"]["accuracy"])
    shown = runner.invoke(app, ["eval", str(tmp_path / "ex" / "test_resnet.safetensors")])
    assert shown.exit_code == 0 and "airplane" in shown.output and "confusion" in shown.output
    drawn = runner.invoke(app, ["report", str(run)])
    assert drawn.exit_code == 0, drawn.output
    assert (run / "curves-per-class.png").is_file()


def _cli(args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "clcli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(Path(__file__).parents[1]),
                               **(env or {})}, timeout=600)


def test_wandb_and_mlflow_hold_metrics_jsonl_across_a_sigkill_and_resume(tmp_path):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    args = tiny_args(run) + ["--log", "wandb,mlflow,tensorboard", "--set", "train.log_every=4"]
    # 8 steps an epoch, a record every 4: killed in the second epoch after its step-12 record was sent
    dead = _cli(args, tmp_path, env={"CLCLI_FAULT_KILL_AT_STEP": "13"})
    assert dead.returncode == -9, dead.stderr
    assert max(r["step"] for r in read_metrics(run)) == 12
    resumed = _cli(["train", "--resume", str(run), "--no-progress"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    expected = expected_history(run)
    assert max(step for _, step in expected) == 16

    ids, history = wandb_history(run)
    assert len(ids) == 1 and len(list((run / "wandb").glob("offline-run-*"))) == 2  # two sessions, one run
    assert_same(history, expected, measured_again=(12,))  # W&B may or may not have written step 12 when killed

    runs, histories = mlflow_history(tmp_path / "mlruns")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    # MLflow writes at once: it held step 12 when killed
    assert_same(histories[runs[0].info.run_id], expected, measured_again=(12,))
    assert_same(tensorboard_history(run), expected)  # all purged, then sent metrics.jsonl's records again

    info = json.loads((run / "run.json").read_text())
    assert info["tracking"]["mlflow"]["run_id"] == runs[0].info.run_id and info["tracking"]["wandb"]["id"] in ids
    exported = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "ex"), "--no-measure", "--log"])
    assert exported.exit_code == 0, exported.output
    from mlflow.tracking import MlflowClient

    artifacts = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri()).list_artifacts(runs[0].info.run_id,
                                                                                         "exported")
    assert sorted(Path(a.path).name for a in artifacts) == ["manifest.json", "test_efficientnet.safetensors",
                                                            "test_resnet.safetensors"]


def test_compare_logs_its_runs_as_one_group_and_writes_per_class_table(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", "--recipe", "quickstart", "--methods", "il,cl", "--seeds", "1",
                                 "--epochs", "1", "--out", str(out), "--no-progress", "--log", "mlflow,wandb",
                                 "--set", f"models=[{', '.join(TINY)}]", "--set", "data.train_limit=64",
                                 "--set", "data.test_limit=40", "--set", "train.batch_size=32",
                                 "--set", "train.threads=2"])
    assert result.exit_code == 0, result.output
    runs, histories = mlflow_history(tmp_path / "mlruns")
    parents = [r for r in runs if r.data.tags.get("clcli.group") == "compare-cmp"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    for child in children:
        assert_same(histories[child.info.run_id], expected_history(Path(child.data.tags["clcli.run_folder"])))
    wandb_cli = Path(sys.executable).with_name("wandb")
    groups = []
    for method in ("il", "cl"):
        for session in (out / "runs" / method / "seed0" / "wandb").glob("offline-run-*"):
            lines = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(session)], capture_output=True,
                                   text=True, check=True).stdout.splitlines()
            groups += [json.loads(ln)["run"]["run_group"] for ln in lines if json.loads(ln)["type"] == "run"]
    assert groups == ["compare-cmp", "compare-cmp"]
    table = (out / "per_class.md").read_text()
    assert "| class | IL | CL |" in table and table.count("| airplane |") == 2  # one table per network
    info = json.loads((out / "runs" / "cl" / "seed0" / "run.json").read_text())
    first = next(ln for ln in table.splitlines() if ln.startswith("| airplane |"))
    assert first.split("|")[3].strip() == f"{info['per_class'][TINY[0]]['accuracy'][0]:.2f}"


def test_under_torchrun_only_rank_0_logs(tmp_path):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    run = tmp_path / "ddp"
    # torchrun's own parser takes `--log` for an abbreviation of its --log-dir: under torchrun, train.log is set
    sets = ["data.train_limit=64", "data.test_limit=32", "train.batch_size=32", "methods=[cl]", "train.threads=1",
            "train.epochs=1", "train.log_every=1", f"models=[{', '.join(TINY)}]", "train.log=[tensorboard,wandb,mlflow]"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "clcli", "train", "--recipe", "quickstart", "--out", str(run), "--no-progress",
                           *[x for s in sets for x in ("--set", s)]],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
                               "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 0, done.stderr
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1
    runs, histories = mlflow_history(tmp_path / "mlruns")
    assert len(runs) == 1
    expected = expected_history(run)
    assert_same(tensorboard_history(run), expected)
    assert_same(histories[runs[0].info.run_id], expected)


@pytest.mark.parametrize("name,package", [("tensorboard", "tensorboard"), ("wandb", "wandb"),
                                          ("mlflow", "mlflow-skinny")])
def test_a_missing_extra_is_one_line_exit_2_before_any_folder(tmp_path, name, package):
    out = tmp_path / "run"
    hide = f"import sys; sys.modules[{tracking.TRACKERS[name][0]!r}] = None"  # as if not installed
    result = subprocess.run([sys.executable, "-c", f"{hide}; from clcli.cli import main; main()",
                             *tiny_args(out), "--log", name], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f'pip install "clcli[{name}]"' in result.stderr and package in result.stderr
    assert not out.exists()


def test_an_unknown_tracker_is_refused_by_the_recipe():
    with pytest.raises(Exception, match=r"'train.log.0' must be one of tensorboard, wandb, mlflow, got 'tensorbored'"):
        recipes.resolve("quickstart", log="tensorbored")


class _Failing(tracking.Tracker):
    name = "failing"

    def log(self, step, scalars):
        raise OSError("No space left on device")


class _Kept(tracking.Tracker):
    name = "kept"

    def __init__(self):
        self.steps = []

    def log(self, step, scalars):
        self.steps.append((step, scalars))


def test_a_failing_tracker_is_reported_once_and_the_others_go_on():
    notes, kept = [], _Kept()
    trackers = tracking.Trackers([_Failing(), kept], ["a", "b"], note=notes.append)
    for step in (4, 8):
        trackers.log({"type": "step", "epoch": 0, "step": step, "lr": 0.1, "0/cls": 1.5, "1/cls": 2.5})
    trackers.log({"type": "epoch", "epoch": 0, "step": 8, "lr": 0.1, "test_acc": {"a": 50.0, "b": 60.0}})
    assert len(notes) == 1 and "failing" in notes[0] and "No space left" in notes[0]
    assert [s for s, _ in kept.steps] == [4, 8, 8]
    assert kept.steps[0][1] == {"epoch": 0.0, "lr": 0.1, "a/cls": 1.5, "b/cls": 2.5}
    assert kept.steps[2][1] == {"a/test_acc": 50.0, "b/test_acc": 60.0}


def test_after_a_resume_a_tracker_is_sent_only_what_it_does_not_hold():
    holding, empty = _Kept(), _Kept()
    holding.held = (12, 0)  # the step record at step 12, not an epoch record there
    trackers = tracking.Trackers([holding, empty], ["a"])
    for step, kind in ((12, "step"), (12, "epoch"), (16, "step"), (16, "epoch")):
        trackers.log({"type": kind, "epoch": 1, "step": step, "0/cls": 1.0})
    assert [s for s, _ in holding.steps] == [12, 16, 16] and [s for s, _ in empty.steps] == [12, 12, 16, 16]
    assert tracking.position_of({8: {"a/cls"}, 12: {"a/cls", "a/test_acc"}}) == (12, 1)


class _Fixed(nn.Module):
    """Answers a fixed list of classes, whatever the images."""

    def __init__(self, answers: list[int], classes: int):
        super().__init__()
        self.logits = nn.Parameter(torch.eye(classes)[answers], requires_grad=False)

    def forward(self, x):
        return self.logits[:len(x)]


def test_per_class_accuracy_and_confusion_are_a_hand_count():
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3])
    answers = [0, 1, 1, 1, 0, 2, 2]
    images = torch.zeros(len(labels), 3, 4, 4, dtype=torch.uint8)
    result = evaluation.evaluate(_Fixed(answers, 4), images, labels, [0, 0, 0], [1, 1, 1], num_classes=4)
    assert result["confusion"] == [[1, 1, 0, 0], [1, 2, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0]]
    assert [sum(row) for row in result["confusion"]] == [2, 3, 1, 1]
    assert evaluation.per_class_accuracy(result["confusion"]) == pytest.approx([50.0, 200 / 3, 100.0, 0.0])
    assert evaluation.per_class_accuracy([[0, 0], [1, 1]]) == [None, 50.0]  # a class without images
    assert result["top1"] == pytest.approx(100 * 4 / 7)
