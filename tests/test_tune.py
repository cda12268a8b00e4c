"""`clcli tune`: a study of pruned trials on a validation split, resumable after a kill, shared by two processes."""
import json
import os
import subprocess
import sys
import time

import pytest

from clcli import recipes
from clcli.errors import ClcliError

from _helpers import TINY, cli, tiny_recipe

optuna = pytest.importorskip("optuna")

SMALL = ["--set", "data.train_limit=96", "--set", "data.test_limit=40", "--set", "train.batch_size=24",
         "--set", "train.threads=1", "--set", "stem=small", "--set", "data.val_fraction=0.25"]


def tune_args(out, trials=3, epochs=1, *more):
    return ["tune", "--models", *TINY, "--trials", str(trials), "--epochs", str(epochs), "--out", str(out),
            "--no-progress", *SMALL, "--set", "tune.sites=[8x8, 4x4]", *more]


def small_recipe(**tune):
    recipe = tiny_recipe(epochs=1)
    recipe.data.train_limit, recipe.data.test_limit, recipe.train.batch_size = 96, 40, 24
    recipe.data.val_fraction, recipe.train.threads = 0.25, 1
    recipe.tune.sites = tune.get("sites", ["8x8", "4x4"])
    return recipe


def study_of(out):
    return optuna.load_study(study_name=out.name, storage=f"sqlite:///{out / 'study.db'}")


def test_a_study_trains_il_first_then_cl_trials_each_a_run_folder_and_writes_the_best_recipe(tmp_path):
    from clcli.tune import tune

    out = tmp_path / "study"
    result = tune(small_recipe(), out, trials=3, show_progress=False)
    trials = study_of(out).get_trials()
    assert trials[0].user_attrs["method"] == "il" and result["il"] == 0
    assert {t.state for t in trials} <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert len(trials) == 3 and all(t.params["sites"] in ("8x8", "4x4") for t in trials[1:])
    for t in trials:  # an ordinary run folder per trial, trained and validated on the training images only
        run_dir = out / "trials" / f"{t.number:03d}"
        info = json.loads((run_dir / "run.json").read_text())
        assert (run_dir / "recipe.yaml").is_file() and (run_dir / "plan.json").is_file()
        assert info["method"] == ("il" if t.number == 0 else "cl") and info["val_acc"] == t.user_attrs["val_acc"]
        assert info["data"]["train_images"] == 72  # 96 less the quarter held out for validation
        assert all("val_acc" in r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                   if r["type"] == "epoch")
    assert "IL" not in result["verdict"] or "trial" in result["verdict"]
    best = recipes.load(str(out / "best.yaml"))  # `clcli train --recipe OUT/best.yaml` trains it at full budget
    chosen = study_of(out).trials[result["best"]]
    assert best.cl.sites == chosen.params["sites"].split("+") and best.cl.alpha == pytest.approx(chosen.params["alpha"])
    assert best.train.epochs == 1 and best.methods == ["cl"] and not best.data.validate
    assert "| 0 | complete | il |" in (out / "study.md").read_text()


def test_a_pruned_trial_stops_cleanly_marked_pruned(tmp_path, monkeypatch):
    from clcli import tune as tune_module

    # a pruner that stops every trial it is asked about (IL is never asked: the reference runs to the end)
    monkeypatch.setattr(tune_module, "_pruner", lambda optuna, cfg, epochs: optuna.pruners.ThresholdPruner(lower=101.0))
    out = tmp_path / "study"
    result = tune_module.tune(small_recipe(sites=["4x4"]), out, trials=2, epochs=2, show_progress=False)
    il, cl = study_of(out).get_trials()
    pruned = result["rows"][1]  # set against IL at the epoch it reached, not at IL's end
    assert pruned["epochs"] == 1 and len(il.user_attrs["val_acc_by_epoch"]) == 2
    assert pruned["minus_il"] == {k: v - il.user_attrs["val_acc_by_epoch"][0][k] for k, v in pruned["val_acc"].items()}
    assert il.state == optuna.trial.TrialState.COMPLETE and il.user_attrs["epochs"] == 2
    assert cl.state == optuna.trial.TrialState.PRUNED
    info = json.loads((out / "trials" / "001" / "run.json").read_text())
    assert info["status"] == "pruned" and info["epochs"] == 1 and (out / "trials" / "001" / "checkpoint.pt").is_file()


@pytest.mark.parametrize("override, message", [
    ("tune.sites=[3x3]", "do not meet at 3x3; they meet at"),
    ("tune.alpha.low=-0.1", "'tune.alpha.low' must be between"),
    ("tune.alpha.values=[0.1]", "either a range (low, high) or a choice (values)"),
    ("tune.lr.low=0.01", "'tune.lr' needs both low and high"),
    ("tune.depth=3", "unknown key 'tune.depth'"),
])
def test_a_bad_search_space_is_one_line_before_any_trial(tmp_path, override, message):
    out = tmp_path / "study"
    done = cli(tune_args(out, 3, 1, "--set", override))
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (out / "trials").exists()


def test_a_killed_study_continues_with_the_same_command_rerunning_the_interrupted_trial(tmp_path):
    out = tmp_path / "study"
    dead = cli(tune_args(out, 3), env={"CLCLI_FAULT_KILL_AT_STEP": "1"})  # SIGKILL in IL's second step
    assert dead.returncode == -9
    assert study_of(out).get_trials()[0].state == optuna.trial.TrialState.RUNNING
    again = cli(tune_args(out, 3))
    assert again.returncode == 0, again.stderr
    trials = study_of(out).get_trials()
    assert trials[0].state == optuna.trial.TrialState.FAIL  # the killed one, run again as a new trial
    rerun = [t for t in trials if t.user_attrs.get("retry_of") == 0]
    assert len(rerun) == 1 and rerun[0].user_attrs["method"] == "il" and rerun[0].state.is_finished()
    finished = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) == 3


def test_ctrl_c_is_one_line_and_the_same_command_continues(tmp_path):
    out = tmp_path / "study"
    stopped = cli(tune_args(out, 3), env={"CLCLI_FAULT_KILL_AT_STEP": "1", "CLCLI_FAULT_SIGNAL": "INT"})
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr, stopped.stderr
    assert "run the same `clcli tune` again to continue" in stopped.stderr
    again = cli(tune_args(out, 3), env={"COLUMNS": "80"})
    assert again.returncode == 0
    table = [line for line in again.stdout.splitlines() if line[:1] in "┏┃┡│└"]
    assert max(map(len, table)) <= 80 and "test_efficientnet" in "".join(table)  # names whole at 80 columns
    trials = study_of(out).get_trials()
    assert trials[0].user_attrs.get("interrupted") and [t.user_attrs.get("retry_of") for t in trials].count(0) == 1


def test_two_processes_work_on_one_study(tmp_path):
    out = tmp_path / "study"
    env = {**os.environ, "COLUMNS": "120"}
    first = subprocess.Popen([sys.executable, "-m", "clcli", *tune_args(out, 5)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "trials" / "000").exists() and time.time() < deadline:  # the first has created the study
        time.sleep(0.5)
    second = cli(tune_args(out, 5))
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0 and second.returncode == 0, err + second.stderr
    trials = study_of(out).get_trials()
    finished = [t for t in trials if t.state.is_finished()]
    assert 5 <= len(finished) <= 6  # each process stops once the study holds 5; one may be finishing its last
    assert [t.user_attrs.get("method") for t in trials].count("il") == 1
    hosts_pids = {t.user_attrs["pid"] for t in trials}
    assert len(hosts_pids) == 2  # both took trials
    assert sorted(p.name for p in (out / "trials").iterdir()) == [f"{t.number:03d}" for t in trials]
    drawn = [tuple(sorted(t.params.items())) for t in trials if t.params]
    assert len(drawn) == len(set(drawn))  # the second process does not draw the first one's configurations again


def test_an_interrupted_twin_of_a_measured_configuration_is_not_run_again(tmp_path):
    import socket

    from clcli import tune

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", direction="maximize")
    alpha = optuna.distributions.FloatDistribution(0.01, 1.0, log=True)
    here = {"host": socket.gethostname(), "interrupted": True}
    study.add_trial(optuna.trial.create_trial(params={"alpha": 0.3}, distributions={"alpha": alpha}, value=1.0))
    for value in (0.3, 0.5, 0.5):  # a twin of the finished one, and one configuration interrupted twice
        study.add_trial(optuna.trial.create_trial(params={"alpha": value}, distributions={"alpha": alpha},
                                                  state=optuna.trial.TrialState.FAIL, user_attrs=here))
    tune._rerun_interrupted(optuna, study)
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [(t.system_attrs["fixed_params"], t.user_attrs["retry_of"]) for t in waiting] == [({"alpha": 0.5}, 2)]


def test_a_process_joining_a_busy_study_draws_apart_and_one_continuing_alone_draws_reproducibly(tmp_path):
    from clcli import tune

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}")
    study.enqueue_trial({})
    assert tune._joining_seed(optuna, study) == 1
    study.ask()  # a trial running in another process
    assert tune._joining_seed(optuna, study) is None


def test_without_optuna_tune_says_how_to_install_it(monkeypatch):
    import builtins

    from clcli import tune as tune_module

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "optuna" else real(name, *a, **k))
    with pytest.raises(ClcliError, match=r"pip install 'clcli\[tune\]'"):
        tune_module.require_optuna()


def test_a_space_of_choices_is_searched_as_a_grid_that_ends_the_study_when_exhausted(tmp_path):
    from clcli.tune import tune

    recipe = small_recipe(sites=["8x8", "4x4"])
    recipe.tune.alpha.low = recipe.tune.alpha.high = None
    recipe.tune.alpha.values = [0.2]
    out = tmp_path / "study"
    tune(recipe, out, trials=10, show_progress=False)  # IL + a grid of 2: the study ends at 3 trials, not 10
    trials = study_of(out).get_trials()
    assert len(trials) == 3 and sorted(t.params["sites"] for t in trials[1:]) == ["4x4", "8x8"]
    assert all(t.params["alpha"] == 0.2 for t in trials[1:])


def test_the_median_pruner_waits_a_third_of_the_epochs(tmp_path):
    from clcli import tune

    pruner = tune._pruner(optuna, small_recipe().tune, 10)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    for value in (90.0, 80.0, 70.0):  # three finished trials, the startup the median needs
        trial = study.ask()
        for epoch in range(10):
            trial.report(value, epoch)
        study.tell(trial, value)
    worst = study.ask()
    for epoch in range(3):
        worst.report(10.0, epoch)
        assert worst.should_prune() == (epoch >= 3)  # epochs 0-2 (the first third) are never judged
    worst.report(10.0, 3)
    assert worst.should_prune()


def test_a_choice_of_values_replaces_the_default_range_and_a_range_given_beside_it_is_one_line(tmp_path):
    choice = tmp_path / "choice.yaml"
    choice.write_text("tune:\n  alpha: {values: [0.1, 0.2]}\n")  # the form docs/cli.md shows
    alpha = recipes.load(str(choice)).tune.alpha
    assert (alpha.low, alpha.high, alpha.values) == (None, None, [0.1, 0.2])
    both = tmp_path / "both.yaml"
    both.write_text("tune:\n  alpha: {low: 0.05, high: 1.0, values: [0.1]}\n")
    with pytest.raises(ClcliError, match="either a range"):
        recipes.load(str(both))
    given = recipes.load("quickstart", ["tune.alpha={values: [0.3]}"]).tune.alpha  # the --set form the error names
    assert (given.low, given.high, given.values) == (None, None, [0.3])


def test_a_studys_trials_are_one_group_in_the_trackers():
    from clcli.tune import _trial_base

    recipe = small_recipe()
    recipe.train.log = ["tensorboard"]
    assert _trial_base(recipe, 2, "mine").train.log_group == "tune-mine"
    recipe.train.log = []
    assert _trial_base(recipe, 2, "mine").train.log_group is None
