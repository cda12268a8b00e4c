"""Training: `train(recipe, out)` runs every method of a recipe on its data and writes one run folder per method.

Public API: `train`, `resume`, `fit`, `train_step`, `Interrupted` and `interrupt_signals` (SIGINT, SIGTERM and
SIGHUP raise `Interrupted` inside it; `as_interrupted` makes a plain KeyboardInterrupt one); re-exported for
convenience: `load_data` (clcli.data), `evaluate` (clcli.evaluation), `build_cohort` and `Cohort` (clcli.cohort).
"""
from __future__ import annotations

import platform
from pathlib import Path

from clcli import files, tracking
from clcli import run as run_folder
from clcli.cohort import (Cohort, build_cohort, check_networks_run, compile_networks,
                          enable_grad_checkpointing)
from clcli.data import Data, LoadedData, load_data, streamed_skips
from clcli.errors import ClcliError, is_out_of_memory, one_line
from clcli.evaluation import evaluate

from . import _dist
from ._dist import resolve_device
from ._interrupt import Interrupted, as_interrupted, interrupt_signals
from ._loop import fit, mixed_precision, param_groups, speed_settings, train_step
from ._optim import Optimisation

def _resolve_pretrained_input(recipe) -> list[str]:
    """input_size None becomes the first model's pretrained input size (images are decoded at that size). Returns
    notes for the user: what was taken from the pretrained config, and which models were pretrained otherwise."""
    from clcli import models

    if recipe.input_size is not None and recipe.data.normalize != "pretrained":
        return []
    first = recipe.models[0]
    configs = {name: models.pretrained_config(name) for name in dict.fromkeys(recipe.models)}
    ref = configs[first]
    notes = []
    if recipe.input_size is None:
        recipe.input_size = max(ref["input_size"])
        notes.append(f"input size {recipe.input_size} px: {first}'s pretrained config")
    if recipe.data.normalize == "pretrained":
        notes.append(f"mean {list(ref['mean'])}, std {list(ref['std'])}: {first}'s pretrained config")
    for name, cfg in configs.items():
        differs = cfg["input_size"] != ref["input_size"] or (
            recipe.data.normalize == "pretrained" and (cfg["mean"], cfg["std"]) != (ref["mean"], ref["std"]))
        if name != first and differs:
            notes.append(f"{name} was pretrained at {cfg['input_size'][0]} px, mean {cfg['mean']}, std {cfg['std']}; "
                         f"the cohort shares one input: {recipe.input_size} px, normalised as {first} was")
    return notes


def _starting_weights(recipe) -> dict[str, str]:
    """Where each network's starting weights come from, in words (for run.json and the console)."""
    return {name: (f"file {recipe.weights[name]}" if name in recipe.weights
                   else "timm pretrained (Hub)" if recipe.pretrained else "random")
            for name in recipe.models}


def _check_weights(recipe) -> None:
    for name, file in recipe.weights.items():
        if name not in recipe.models:
            raise ClcliError(f"--weights names '{name}', which is not one of the models ({', '.join(recipe.models)})")
        if not Path(file).expanduser().is_file():
            raise ClcliError(f"weights file for '{name}' not found: {file}")


def read_plan(recipe, plan_path: str) -> tuple[object, list[str]]:
    """A `clcli probe --json` plan, and the recipe made to match it: the plan decides the models, the input size,
    the stem and the number of MKBs (the MKBs are built exactly as planned). Returns (plan, notes on what changed)."""
    from clcli import probe

    raw = files.read_json(plan_path, "plan file")
    try:
        plan = probe.Plan.from_dict(raw)
    except ClcliError as e:  # say which file the plan came from
        raise ClcliError(f"plan file {plan_path}: {e}") from None
    height, width = plan.input_size
    if height != width:
        raise ClcliError(f"{plan_path} plans a {height}x{width} input; recipes train on square inputs")
    changed = []
    for key, planned, current in (("models", plan.names, list(recipe.models)), ("input_size", height,
                                  recipe.input_size), ("stem", plan.stem, recipe.stem),
                                  ("cl.mkbs", len(plan.sites), recipe.cl.mkbs), ("cl.sites", [], recipe.cl.sites)):
        if planned != current:
            changed.append(f"{key} {current} -> {planned}")
    recipe.models, recipe.input_size, recipe.stem, recipe.cl.mkbs = plan.names, height, plan.stem, len(plan.sites)
    recipe.cl.sites = []  # the plan's sites are built as they are
    notes = [f"the plan {plan_path} decides: " + "; ".join(changed)] if changed else []
    return plan, notes


def _plan_for(recipe, num_classes: int):
    from clcli import probe

    return probe.plan(list(recipe.models), recipe.input_size, stem=recipe.stem, mkbs=recipe.cl.mkbs,
                      num_classes=num_classes, embedding=recipe.cl.embedding, budget=recipe.cl.budget,
                      sites=recipe.cl.sites)


def _versions() -> dict:
    import timm
    import torch

    from clcli.version import __version__

    return {"clcli": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def _run_dirs(recipe, out: Path) -> list[tuple[str, Path]]:
    if len(recipe.methods) == 1:
        return [(recipe.methods[0], out)]
    return [(m, out / m) for m in recipe.methods]


def train(recipe, out: str | Path, *, plan_path: str | None = None, force: bool = False,
          show_progress: bool = True, console=None) -> dict[str, dict]:
    """Train every method of `recipe`; returns {method: summary}. Each method gets its own run folder.

    A run that stops before its first checkpoint leaves nothing behind (there is nothing to resume or export).
    Ctrl-C, SIGTERM and SIGHUP raise `Interrupted`, whose message says where training stopped and how to continue."""
    out = Path(out)
    with interrupt_signals():
        try:
            return _train(recipe, out, plan_path=plan_path, force=force, show_progress=show_progress,
                          console=console)
        except Interrupted as e:  # the outermost call knows the folder to resume (a fold's run is inside it)
            e.hint = _resume_hint(out)
            raise


def _resume_hint(out: Path) -> str:
    if (out / "folds.json").is_file() or any(out.glob(f"**/{run_folder.CHECKPOINT}")):
        return f"continue with `clcli train --resume {out}`"
    return "no checkpoint had been written, so nothing was kept: start the run again"


def _train(recipe, out: Path, *, plan_path: str | None, force: bool, show_progress: bool,
           console) -> dict[str, dict]:
    from clcli import methods

    files.check_output_dir(out, "run folder")
    tracking.check(recipe.train.log)  # a tracker that is not installed: one line, before anything is written
    for m in recipe.methods:
        methods.uses_mkb(m)  # unknown method -> one-line error before any work
    if len(recipe.models) < 2 and any(methods.uses_mkb(m) for m in recipe.methods):
        raise ClcliError("collaborative learning needs at least 2 models")
    if recipe.data.folds and recipe.data.fold is None:  # every predefined fold (STL-10), then the mean over folds
        from ._folds import train_folds

        return train_folds(recipe, out, train_one=train, plan_path=plan_path, force=force,
                           show_progress=show_progress, console=console)
    plan, notes = read_plan(recipe, plan_path) if plan_path else (None, [])
    _check_weights(recipe)
    notes += _resolve_pretrained_input(recipe)  # before anything is written: recipe.yaml records the resolved size
    runs = _run_dirs(recipe, out)
    main = _dist.is_main_process()  # under torchrun, rank 0 alone writes the run folder
    out_existed = out.exists()
    if main:
        run_folder.prepare(out, resume=False, force=force)  # all of --out: a new run never joins an earlier one
        for _, run_dir in runs:
            run_dir.mkdir(exist_ok=True)
    try:
        return _train_prepared(recipe, runs, plan, notes, main, show_progress, console)
    except BaseException:
        if main and not any((run_dir / run_folder.CHECKPOINT).is_file() for _, run_dir in runs):
            run_folder.discard_unstarted([run_dir for _, run_dir in runs], None if out_existed else out)
        raise


def _train_prepared(recipe, runs, plan, notes, main: bool, show_progress: bool, console) -> dict[str, dict]:
    import yaml

    _apply_threads(recipe)
    device = _dist.setup(recipe)  # joins the torchrun process group, if any
    data = load_data(recipe, device)
    plan = plan if plan is not None else _plan_for(recipe, len(data.class_names))
    for model in plan.models:  # timm.create_model's options (drop_path_rate, ...): in plan.json, and so in exports
        model.kwargs.update(recipe.model_kwargs)
    starting = _starting_weights(recipe)
    if recipe.pretrained or recipe.weights:
        notes.append("starting weights: " + "; ".join(f"{name}: {src}" for name, src in starting.items()))
    for note in notes + data.notes:
        if console is not None:
            console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    data_info = {"train_images": len(data.train_labels), "eval_images": len(data.test_labels),
                 "evaluation": data.evaluation, "skipped_images": data.skipped}
    # Every method's run folder is complete before the first trains: `--resume` of the whole folder finds them all.
    for method_name, run_dir in runs:
        info = {"format": run_folder.RUN_FORMAT, "method": method_name, "models": plan.names,
                "class_names": data.class_names, "mean": list(data.mean), "std": list(data.std),
                "input_size": list(plan.input_size), "data": data_info, "starting_weights": starting,
                "status": "pending", "processes": _dist.current().world, "versions": _versions()}
        if main:
            files.write_text(run_dir / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
            files.write_json(run_dir / "plan.json", dict(plan.to_dict(), fuse=recipe.cl.fuse))
            files.write_json(run_dir / "run.json", info)
    results = {}
    for method_name, run_dir in runs:
        results[method_name] = _train_one(method_name, recipe, plan, data, run_dir, device, None, show_progress,
                                          console)
        results[method_name]["skipped_images"] = len(data.skipped) + len(streamed_skips(data))
    return results


def _train_one(method_name, recipe, plan, data, run_dir: Path, device, state, show_progress, console) -> dict:
    import torch

    from clcli import methods

    method_cls = methods.get(method_name)
    main = _dist.is_main_process()  # under torchrun, rank 0 alone writes the run folder
    info = files.read_json(run_dir / "run.json", "run file") if main else {}
    trackers = _start_tracking(method_name, recipe, plan, run_dir, info, state, console) if main else tracking.NONE
    if main:
        info["status"] = "running"
        if trackers.ids():
            info["tracking"] = {**info.get("tracking", {}), **trackers.ids()}  # --resume continues these runs
        files.write_json(run_dir / "run.json", info)
    try:
        # Starting weights only matter for a fresh start: a checkpoint replaces them (and needs no download).
        cohort = build_cohort(plan, num_classes=len(data.class_names), seed=recipe.train.seed,
                              with_mkb=method_cls.uses_mkb, fuse=recipe.cl.fuse,
                              shared_transfer=method_cls.shared_transfer,
                              pretrained=recipe.pretrained and state is None,
                              weights=recipe.weights if state is None else None)
        if method_cls.needs_teacher:  # kd, fitnets: network 0 is the frozen teacher
            from ._teacher import load_teacher

            load_teacher(cohort.networks[0], recipe.kd.teacher, cohort.names[0], method_name)
        cohort.to(device)
        if state is None:  # a fresh start; a resumed run has run already
            check_networks_run(cohort, device)
        if recipe.train.channels_last:
            cohort.to(memory_format=torch.channels_last)
        method = methods.create(method_name, cohort, recipe)
        if recipe.train.grad_checkpointing:  # after the method has hooked in what it records
            enable_grad_checkpointing(cohort, device)
        if recipe.train.compile:
            compile_networks(cohort)
        summary = fit(method, data, recipe, run_dir, start_state=state, show_progress=show_progress,
                      console=console, trackers=trackers)
    except BaseException as e:
        info["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        trackers.close(info["status"])
        if main:
            try:
                files.write_json(run_dir / "run.json", info)
            except ClcliError:  # a full disk: the error being raised says so; run.json keeps "running"
                pass
        if is_out_of_memory(e):
            checkpoint = run_dir / run_folder.CHECKPOINT
            kept = (f"the last checkpoint is kept in {checkpoint}" if checkpoint.is_file()
                    else "no epoch had finished, so nothing was kept")
            raise ClcliError(f"out of memory on {device} training {' + '.join(plan.names)} at train.batch_size "
                             f"{recipe.train.batch_size} ({one_line(e, 200)}); {kept}; lower train.batch_size, "
                             f"split each step with train.accumulate, or turn on train.grad_checkpointing "
                             f"(and train.mixed_precision on a GPU)") from None
        raise
    info.update(status="finished", epochs=summary["epochs"], test_acc=summary["test_acc"],
                **{k: summary[k] for k in ("ema_test_acc", "best", "stopped_early", "per_class") if k in summary})
    met = streamed_skips(data)  # met while streaming: added to what loading found
    if met and main:
        known = {s["image"] for s in info["data"]["skipped_images"]}
        info["data"]["skipped_images"] += [s for s in met if s["image"] not in known]
    if "test_top5" in summary:
        info["test_top5"] = summary["test_top5"]
    if trackers:
        from clcli._report import results_markdown

        trackers.finish(results_markdown(info))
        trackers.close("finished")
    if main:
        files.write_json(run_dir / "run.json", info)
        from clcli.plots import run_curves_png

        run_curves_png([run_dir], run_dir / "curves.png")  # the end-of-run picture: losses and accuracy per epoch
    return summary


def _start_tracking(method_name: str, recipe, plan, run_dir: Path, info: dict, state, console) -> tracking.Trackers:
    """The run's trackers (train.log), each continuing its logged run when resuming (ids kept in run.json) and
    sent first the records metrics.jsonl keeps that it lacks: each is sent only records it does not hold."""
    if not recipe.train.log:
        return tracking.NONE
    import yaml

    from clcli import recipes
    from clcli._report import plan_text
    from clcli.models import network_labels

    records = run_folder.read_metrics(run_dir)  # before the loop truncates it to the checkpoint's epochs
    start_epoch = int(state["epoch"]) if state is not None else 0
    cfg = recipe.train
    name = f"{recipe.name}-{method_name}-seed{cfg.seed}" + (
        f"-fold{recipe.data.fold}" if recipe.data.fold is not None else "")
    context = tracking.Context(
        run_dir=run_dir, name=name, labels=network_labels(list(plan.names)),
        hparams={"method": method_name, **recipes.flat(recipe)},
        texts={"plan": plan_text(plan), "recipe": yaml.safe_dump(recipe.to_dict(), sort_keys=False)},
        project=cfg.log_project, entity=cfg.log_entity, group=cfg.log_group, previous=info.get("tracking", {}),
        resumed=bool(records) or state is not None)

    def note(text: str) -> None:
        from rich.markup import escape

        console.print(f"[yellow]note:[/] {escape(text)}", highlight=False, soft_wrap=True)

    trackers = tracking.start(cfg.log, context, note=note if console is not None else None)
    for record in records:  # resuming: what metrics.jsonl keeps and a tracker lacks (a kill cut its last seconds)
        if int(record.get("epoch", 1 << 30)) < start_epoch:
            trackers.log(record)
    return trackers


def resume(run_dir: str | Path, *, show_progress: bool = True, console=None) -> dict[str, dict]:
    """Continue the run(s) in `run_dir` from their last checkpoint; finished runs are left as they are (and said to
    be). Ctrl-C, SIGTERM and SIGHUP raise `Interrupted`, as in `train`."""
    run_dir = Path(run_dir)
    with interrupt_signals():
        try:
            return _resume(run_dir, show_progress=show_progress, console=console)
        except Interrupted as e:
            e.hint = f"continue with `clcli train --resume {run_dir}`"
            raise


def _resume(run_dir: Path, *, show_progress: bool, console) -> dict[str, dict]:
    if (run_dir / "folds.json").is_file():  # a fold protocol folder: fold<k>/ run folders
        from ._folds import resume_folds

        return resume_folds(run_dir, train_one=train, resume_one=resume, show_progress=show_progress,
                            console=console)
    runs = run_folder.Run.children(run_dir)
    if [r.path for r in runs] != [run_dir]:
        results = {}
        for sub in runs:
            results.update(_resume(sub.path, show_progress=show_progress, console=console))
        return results
    files.check_output_dir(run_dir, "run folder")
    run = runs[0]
    info, recipe, plan = run.info, run.recipe, run.plan
    tracking.check(recipe.train.log)
    method_name = run.method
    if run.finished:
        if console is not None:
            console.print(f"[yellow]note:[/] {run_dir} ({method_name}) is finished: all {info.get('epochs')} epochs "
                          f"were trained, nothing to resume; its recorded results:", highlight=False, soft_wrap=True)
        return {method_name: {"epochs": info["epochs"], "test_acc": info["test_acc"],
                              **({"test_top5": info["test_top5"]} if "test_top5" in info else {})}}
    _apply_threads(recipe)  # a resumed run keeps the thread count it was started with
    device = _dist.setup(recipe)  # joins the torchrun process group, if any
    started_with, now = info.get("processes"), _dist.current().world
    if started_with is not None and started_with != now and console is not None:
        console.print(f"[yellow]note:[/] {run_dir} was trained with {started_with} process"
                      f"{'es' if started_with != 1 else ''} and resumes with {now}: training continues correctly, "
                      f"but the result will not be bit-exact with an uninterrupted run", highlight=False,
                      soft_wrap=True)
    data = load_data(recipe, device)
    state = run.state(map_location=device) if (run_dir / run_folder.CHECKPOINT).exists() else None
    return {method_name: _train_one(method_name, recipe, plan, data, run_dir, device, state, show_progress,
                                    console)}


def _apply_threads(recipe) -> None:
    import torch

    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)


__all__ = ["train", "resume", "Interrupted", "as_interrupted", "interrupt_signals", "fit", "train_step", "Optimisation",
           "param_groups", "mixed_precision", "speed_settings", "resolve_device", "load_data", "evaluate",
           "build_cohort", "Cohort", "Data", "LoadedData"]
