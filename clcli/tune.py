"""`clcli tune`: where the MKB helps a pair on the user's own data, and how strongly, searched with Optuna.

Each trial is an ordinary run folder (OUT/trials/NNN/) trained on the training images less a validation split held out
of them (data.validate), and reports its validation accuracy to Optuna every epoch; Optuna's sampler (TPE, or a grid
when every dimension is a choice) proposes the next configuration and its pruner (median or successive halving) stops
a trial that falls behind, which then ends cleanly, marked pruned. The test split is never looked at. IL at the same
budget is trial 0 of every study: the reference every trial is compared against.

The study lives in OUT/study.db (SQLite) unless --storage names another Optuna storage (a PostgreSQL or MySQL URL, or
a journal file), which several processes or machines share: each asks the study for its next trial. Interrupted or
killed, the same command continues: finished trials are kept, the interrupted trial is run again with the same
parameters (a killed process's trial is found by its process id on this machine; on another machine, by its stopped
heartbeat).
"""
from __future__ import annotations

import math
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

from clcli import files, recipes
from clcli.errors import ClcliError
from clcli.train import Callback, interrupt_signals

IL_TRIAL = {"method": "il"}  # the user attributes of the reference trial
HEARTBEAT_S, GRACE_S = 20, 120  # another machine's trial whose heartbeat stopped this long ago is run again


def require_optuna():
    try:
        import optuna
    except ImportError:
        raise ClcliError("clcli tune needs Optuna: pip install 'clcli[tune]'") from None
    return optuna


@dataclass
class Space:
    """The search space made concrete for one pair: the MKB configurations the probe lists for it, and the ranges."""
    sites: list[str]
    alpha: recipes.SearchRange
    lr: recipes.SearchRange

    def grid(self) -> dict[str, list] | None:
        """Every dimension as a list of values, or None where one is a range (no grid)."""
        if self.alpha.low is not None or self.lr.low is not None:
            return None
        grid = {"sites": self.sites}
        for name, r in (("alpha", self.alpha), ("lr", self.lr)):
            if r.values:
                grid[name] = list(r.values)
        return grid

    def suggest(self, trial) -> dict:
        params = {"sites": trial.suggest_categorical("sites", self.sites)}
        for name, r in (("alpha", self.alpha), ("lr", self.lr)):
            if r.values:
                params[name] = trial.suggest_categorical(name, list(r.values))
            elif r.low is not None:
                params[name] = trial.suggest_float(name, r.low, r.high, log=True)
        return params


def search_space(recipe, num_classes: int) -> Space:
    """The recipe's `tune` section checked against the probe's plan for the pair: every site it names must be one
    the probe lists (one line otherwise); none named: each size the networks meet at, and all of them at once."""
    from clcli import probe

    cfg = recipe.tune
    listed = probe.plan(list(recipe.models), recipe.input_size, stem=recipe.stem, num_classes=num_classes,
                        embedding=recipe.cl.embedding, budget=recipe.cl.budget)
    sizes = list(probe.equal_sizes(listed.candidates))
    sites = list(cfg.sites) or sizes + (["all"] if len(sizes) > 1 else [])
    if not sites:
        raise ClcliError(f"{' and '.join(recipe.models)} meet at no equal map size at {recipe.input_size} px; name "
                         f"the sites to search in tune.sites (`clcli probe` numbers them)")
    for spec in sites:  # one line before any trial for a site the probe does not list
        probe.plan(list(recipe.models), recipe.input_size, stem=recipe.stem, num_classes=num_classes,
                   embedding=recipe.cl.embedding, budget=recipe.cl.budget, sites=spec.split("+"))
    return Space(sites, cfg.alpha, cfg.lr)


def objective_value(val_acc: dict[str, float], kind: str) -> float:
    """The study's objective from each network's validation accuracy: their mean, or the worst network's."""
    values = list(val_acc.values())
    return min(values) if kind == "min" else sum(values) / len(values)


class TrialReport(Callback):
    """A trial's part in its run: the validation accuracy to Optuna every epoch; a trial the pruner stops ends the run
    cleanly after that epoch's checkpoint, its run.json status 'pruned'. The IL reference is never pruned."""

    def __init__(self, trial, kind: str, prunable: bool):
        self.trial, self.kind, self.prunable = trial, kind, prunable
        self.pruned, self.curve = False, []

    def on_epoch_end(self, loop, end) -> None:
        self.curve.append(end.val_acc)
        # each network's curve: a trial pruned at epoch k is compared with IL at epoch k, not at IL's end
        self.trial.set_user_attr("val_acc_by_epoch", self.curve)
        self.trial.report(objective_value(end.val_acc, self.kind), end.epoch)
        if self.prunable and self.trial.should_prune():
            self.pruned = True
            loop.stop = f"trial {self.trial.number} pruned after epoch {end.epoch + 1}: it trails the study"

    def on_fit_end(self, loop, summary: dict) -> None:
        summary["val_images"] = len(loop.data.val_labels)
        if self.pruned:
            summary["status"] = "pruned"


def tune(recipe, out: str | Path, *, trials: int, epochs: int | None = None, study_name: str | None = None,
         storage: str | None = None, show_progress: bool = True, console=None) -> dict:
    """Run (or continue) the study until it holds `trials` finished trials (IL included); returns the table's rows,
    the best trial, the verdict and the paths written."""
    optuna = require_optuna()
    from clcli.data import load_data
    from clcli.train import resolve_device

    out = Path(out)
    files.check_output_dir(out, "tune folder")
    if trials < 2:
        raise ClcliError(f"--trials must be at least 2 (IL, the reference, is one of them), got {trials}")
    name = study_name or out.resolve().name
    base = _trial_base(recipe, epochs, name)
    data = load_data(base, resolve_device("cpu"))  # the data and the search space checked before any trial
    space = search_space(base, len(data.class_names))
    del data
    out.mkdir(parents=True, exist_ok=True)
    # the table and the trials' own lines say what happens; Optuna's warnings for a failed trial carry a traceback
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = _open_study(optuna, recipe.tune, space, name, storage or _default_storage(out),
                        base.train.epochs)
    _rerun_interrupted(optuna, study)
    done = optuna.study.MaxTrialsCallback(trials, states=(optuna.trial.TrialState.COMPLETE,
                                                          optuna.trial.TrialState.PRUNED))
    failures = _Failures()
    try:
        with interrupt_signals():  # Ctrl-C, SIGTERM, SIGHUP: the trial in progress is marked to be run again
            study.optimize(lambda trial: _run_trial(trial, base, space, out, recipe.tune.objective, show_progress,
                                                    console), callbacks=[done, failures], catch=(ClcliError,))
    except KeyboardInterrupt as e:
        from clcli.train import as_interrupted

        stopped = as_interrupted(e)
        stopped.hint = "run the same `clcli tune` again to continue (finished trials are kept, this one re-run)"
        raise stopped from None
    if failures.error is not None:
        raise ClcliError(failures.error)
    return _finish(optuna, study, recipe, space, out)


class _Failures:
    """Stops the study where going on cannot help: the IL reference failed, or three trials in a row did."""

    def __init__(self, in_a_row: int = 3):
        self.in_a_row, self.count, self.error = in_a_row, 0, None

    def __call__(self, study, trial) -> None:
        if trial.state.name != "FAIL" or trial.user_attrs.get("interrupted"):
            self.count = 0
            return
        self.count += 1
        reason = trial.user_attrs.get("error", "see its run folder")
        if trial.user_attrs.get("method") == "il":
            self.error = f"the IL reference trial {trial.number} failed: {reason}"
        elif self.count >= self.in_a_row:
            self.error = f"{self.count} trials in a row failed, the last (trial {trial.number}): {reason}"
        if self.error is not None:
            study.stop()


def _trial_base(recipe, epochs: int | None, study_name: str):
    """The recipe every trial starts from: CL on the training images less a validation split, at the trial budget,
    the study's runs grouped in the trackers."""
    base = recipes.from_dict(recipe.to_dict())
    base.methods = ["cl"]
    base.data.validate = True
    if epochs is not None:
        base.train.epochs = epochs
    if base.train.log and base.train.log_group is None:
        base.train.log_group = f"tune-{study_name}"  # one group a study, not a recipe
    return base


def _default_storage(out: Path) -> str:
    return f"sqlite:///{(out / 'study.db').resolve()}"


def _open_study(optuna, cfg, space: Space, name: str, storage: str, epochs: int):
    """The study, created with IL as its first trial (the process that creates it enqueues it; the storage makes
    one the creator), or loaded as it is."""
    if "://" in storage:
        # SQLite: a process waits for another's write instead of failing at once
        engine = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else None
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna's words, and used as documented
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                store = optuna.storages.RDBStorage(storage, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S,
                                                   grace_period=GRACE_S, **_retry_stale(optuna))
        except Exception as e:  # noqa: BLE001 - a storage URL that does not open: one line
            raise ClcliError(f"cannot open the study storage {storage}: {str(e).splitlines()[0][:200]}") from None
    else:  # a journal file, shared through the file system
        from optuna.storages.journal import JournalFileBackend

        store = optuna.storages.JournalStorage(JournalFileBackend(str(Path(storage).expanduser())))
    try:
        study = optuna.create_study(study_name=name, storage=store, direction="maximize",
                                    sampler=_sampler(optuna, cfg, space), pruner=_pruner(optuna, cfg, epochs))
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=store, pruner=_pruner(optuna, cfg, epochs))
        study.sampler = _sampler(optuna, cfg, space, seed=_joining_seed(optuna, study))
        return study
    study.enqueue_trial({}, user_attrs=IL_TRIAL)
    return study


def _retry_stale(optuna) -> dict:
    """A trial whose heartbeat stopped (its process died on another machine) is run again, up to 3 times: Optuna
    4.9 renamed the option, both are public."""
    if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
        return {"heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)}
    return {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=3)}


def _joining_seed(optuna, study) -> int | None:
    """A process that continues a study alone draws reproducibly (seeded by the trials so far); one that joins a
    study another process is working on draws fresh: with one seed, two workers would sample the same
    configurations one for one."""
    state = optuna.trial.TrialState
    if study.get_trials(deepcopy=False, states=(state.RUNNING,)):
        return None
    return len(study.get_trials(deepcopy=False))


def _sampler(optuna, cfg, space: Space, seed: int | None = 0):
    grid = space.grid()
    if cfg.sampler == "grid" or (cfg.sampler == "auto" and grid is not None):
        if grid is None:
            raise ClcliError("tune.sampler grid needs every searched number given as values, not a range")
        return optuna.samplers.GridSampler(grid, seed=seed)
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant liar: a trial still running counts as a poor one, so parallel workers spread out (Optuna's advice)
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def _pruner(optuna, cfg, epochs: int):
    if cfg.pruner == "none":
        return optuna.pruners.NopPruner()
    if cfg.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    # after IL and two configurations, a trial below the median of the others at the same epoch stops, but not in
    # the first third of its epochs: at a high learning rate the early epochs are noise (docs/results.md section 8:
    # pruned at epoch 2 of 10, near twins of the two best configurations were lost)
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=max(1, epochs // 3))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _rerun_interrupted(optuna, study) -> None:
    """Trials left unfinished by an earlier process on this machine (Ctrl-C, SIGTERM, a kill) are marked failed and
    run again with the same parameters, once."""
    state = optuna.trial.TrialState
    retried = {t.user_attrs.get("retry_of") for t in study.get_trials(deepcopy=False)}
    # a configuration already measured (or queued here) is not run twice
    measured = [t.params for t in study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED))]
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(state.RUNNING, state.FAIL)):
        if t.number in retried or t.user_attrs.get("host") != host:
            continue
        if t.state == state.RUNNING:
            if _alive(int(t.user_attrs.get("pid", -1))):
                continue  # another process here is running it
            study.tell(t.number, state=state.FAIL)
        elif not t.user_attrs.get("interrupted"):
            continue  # failed on its own (a diverging configuration): not run again
        if t.params and t.params in measured:
            continue
        measured.append(t.params)
        keep = {k: v for k, v in t.user_attrs.items() if k == "method"}
        study.enqueue_trial(t.params, user_attrs={**keep, "retry_of": t.number})


def _run_trial(trial, base, space: Space, out: Path, kind: str, show_progress: bool, console) -> float:
    optuna = require_optuna()
    from clcli import train

    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    recipe = recipes.from_dict(base.to_dict())
    il = trial.user_attrs.get("method") == "il"
    if il:
        recipe.methods = ["il"]
    else:
        params = space.suggest(trial)
        recipe.cl.sites = params["sites"].split("+")
        recipe.cl.alpha = params.get("alpha", recipe.cl.alpha)
        recipe.train.lr = params.get("lr", recipe.train.lr)
    run_dir = out / "trials" / f"{trial.number:03d}"
    report = TrialReport(trial, kind, prunable=not il)
    if console is not None:
        what = "IL (the reference)" if il else ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                        for k, v in trial.params.items())
        console.rule(f"trial {trial.number}: {what} → {run_dir}")
    try:
        summary = train.train(recipe, run_dir, force=True, show_progress=show_progress, console=console,
                              callbacks=[report])[recipe.methods[0]]
    except KeyboardInterrupt:
        trial.set_user_attr("interrupted", True)
        raise
    except ClcliError as e:
        trial.set_user_attr("error", str(e))
        if console is not None:
            console.print(f"[bold red]trial {trial.number} failed:[/] {e}", highlight=False, soft_wrap=True)
        raise
    trial.set_user_attr("val_acc", summary["val_acc"])
    trial.set_user_attr("val_images", summary["val_images"])
    trial.set_user_attr("epochs", summary["epochs"])
    if report.pruned:
        raise optuna.TrialPruned()
    return objective_value(summary["val_acc"], kind)


def standard_error(val_acc: dict[str, float], images: int, kind: str) -> float:
    """The sampling error (points) of the objective measured on `images` validation images: a binomial standard
    error per network, combined as the objective combines them (the mean's, or the worst network's)."""
    errors = [100 * math.sqrt(a / 100 * (1 - a / 100) / images) for a in val_acc.values()]
    return max(errors) if kind == "min" else math.sqrt(sum(e * e for e in errors)) / len(errors)


def _finish(optuna, study, recipe, space: Space, out: Path) -> dict:
    """The trials' table (study.md), the best configuration as a recipe (best.yaml) and the verdict."""
    import yaml

    state = optuna.trial.TrialState
    kind = recipe.tune.objective
    trials = study.get_trials(deepcopy=False)
    il = next((t for t in trials if t.user_attrs.get("method") == "il" and t.state == state.COMPLETE), None)
    if il is None:
        raise ClcliError("the IL reference trial has not finished; run the same command again to continue")
    cl = [t for t in trials if t.user_attrs.get("method") != "il" and t.state == state.COMPLETE]
    rows = [_row(t, il, kind) for t in trials]
    error = standard_error(il.user_attrs["val_acc"], il.user_attrs["val_images"], kind)
    best = max(cl, key=lambda t: t.value, default=None)
    if best is None:
        verdict = "no CL trial has finished yet"
    elif best.value - il.value > 2 * error:
        verdict = (f"trial {best.number} ({_describe(best.params)}) beats IL by {best.value - il.value:+.2f} points "
                   f"of validation accuracy ({kind} over the networks), more than twice its sampling error "
                   f"(± {error:.2f}); seeds vary more than that, so confirm it at full budget with a few seeds")
    else:
        verdict = (f"no trial beats IL by more than twice the sampling error of the validation accuracy (± {error:.2f} "
                   f"points on {il.user_attrs['val_images']} images): the best, trial {best.number} "
                   f"({_describe(best.params)}), is {best.value - il.value:+.2f}; at this budget and validation size "
                   f"the search cannot tell CL from IL (a larger data.val_fraction or more epochs per trial can)")
    paths = {"table": out / "study.md"}
    files.write_text(paths["table"], _table_md(rows, verdict, study.study_name))
    if best is not None:
        chosen = recipes.from_dict(recipe.to_dict())
        chosen.cl.sites = best.params["sites"].split("+")
        chosen.cl.alpha = best.params.get("alpha", chosen.cl.alpha)
        chosen.train.lr = best.params.get("lr", chosen.train.lr)
        if "cl" not in chosen.methods:
            chosen.methods = ["cl"]
        chosen.description = f"clcli tune {study.study_name}: trial {best.number}, the best of {len(cl)} CL trials"
        paths["best"] = out / "best.yaml"
        files.write_text(paths["best"], yaml.safe_dump(chosen.to_dict(), sort_keys=False))
    return {"rows": rows, "verdict": verdict, "paths": paths, "best": best.number if best else None,
            "il": il.number}


def _describe(params: dict) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())


def _row(t, il, kind: str) -> dict:
    acc = t.user_attrs.get("val_acc") or {}
    seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start \
        else None
    reached = len(t.user_attrs.get("val_acc_by_epoch", [])) or None
    il_curve = il.user_attrs.get("val_acc_by_epoch", [])
    reference = il_curve[reached - 1] if reached and reached <= len(il_curve) else il.user_attrs["val_acc"]
    return {"trial": t.number, "state": t.state.name.lower(), "method": t.user_attrs.get("method", "cl"),
            "sites": t.params.get("sites", "—"), "alpha": t.params.get("alpha"), "lr": t.params.get("lr"),
            "val_acc": acc, "minus_il": {k: v - reference[k] for k, v in acc.items()}
            if acc and t.number != il.number else {},
            "value": t.value, "epochs": reached or t.user_attrs.get("epochs"), "seconds": seconds}


def _table_md(rows: list[dict], verdict: str, name: str) -> str:
    networks = list(next((r["val_acc"] for r in rows if r["val_acc"]), {}))
    head = ("| trial | state | method | sites | alpha | lr | " + " | ".join(f"{n} val" for n in networks)
            + " | " + " | ".join(f"{n} − IL" for n in networks) + " | epochs | time |")
    lines = [f"# clcli tune: {name}", "", verdict, "",
             "− IL: the difference to the IL trial's validation accuracy at the epoch the trial reached (a pruned "
             "trial stops early).", "", head, "|" + "---|" * (8 + 2 * len(networks))]
    for r in rows:
        cells = [str(r["trial"]), r["state"], r["method"], r["sites"],
                 "—" if r["alpha"] is None else f"{r['alpha']:.3g}", "—" if r["lr"] is None else f"{r['lr']:.3g}",
                 *(f"{r['val_acc'][n]:.2f}" if n in r["val_acc"] else "—" for n in networks),
                 *(f"{r['minus_il'][n]:+.2f}" if n in r["minus_il"] else "—" for n in networks),
                 str(r["epochs"] or "—"), "—" if r["seconds"] is None else f"{r['seconds']:.0f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
