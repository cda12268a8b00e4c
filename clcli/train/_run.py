"""Running a recipe: `train` writes one run folder per method (or per fold) and trains each, `resume` continues a
run folder from its checkpoint. A run folder's status in run.json goes pending, running, then finished, failed or
interrupted; out of memory is one line saying what to change."""
from __future__ import annotations

import contextlib
import platform
from pathlib import Path

from clcli import files, tracking
from clcli import run as run_folder
from clcli.cohort import build_cohort, check_networks_run, compile_networks, enable_grad_checkpointing
from clcli.data import load_data, streamed_skips
from clcli.errors import ClcliError, is_out_of_memory, one_line

from . import _dist
from ._interrupt import Interrupted, interrupt_signals
from ._loop import fit
from ._plan import check_weights, plan_for, read_plan, resolve_pretrained_input, starting_weights
from ._trackers import start_tracking


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
          show_progress: bool = True, console=None, callbacks: list = ()) -> dict[str, dict]:
    """Train every method of `recipe`; returns {method: summary}. Each method gets its own run folder.

    A run that stops before its first checkpoint leaves nothing behind (there is nothing to resume or export).
    `callbacks`: parts of the caller's own (`clcli.train.Callback`) in every run's loop.
    Ctrl-C, SIGTERM and SIGHUP raise `Interrupted`, whose message says where training stopped and how to continue."""
    out = Path(out)
    with interrupt_signals():
        try:
            return _train(recipe, out, plan_path=plan_path, force=force, show_progress=show_progress,
                          console=console, callbacks=callbacks)
        except Interrupted as e:  # the outermost call knows the folder to resume (a fold's run is inside it)
            e.hint = _resume_hint(out)
            raise


def _resume_hint(out: Path) -> str:
    if (out / "folds.json").is_file() or any(out.glob(f"**/{run_folder.CHECKPOINT}")):
        return f"continue with `clcli train --resume {out}`"
    return "no checkpoint had been written, so nothing was kept: start the run again"


def _train(recipe, out: Path, *, plan_path: str | None, force: bool, show_progress: bool,
           console, callbacks) -> dict[str, dict]:
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
    check_weights(recipe)
    notes += resolve_pretrained_input(recipe)  # before anything is written: recipe.yaml records the resolved size
    runs = _run_dirs(recipe, out)
    main = _dist.is_main_process()  # under torchrun, rank 0 alone writes the run folder
    out_existed = out.exists()
    if main:
        run_folder.prepare(out, resume=False, force=force)  # all of --out: a new run never joins an earlier one
        for _, run_dir in runs:
            run_dir.mkdir(exist_ok=True)
    try:
        return _train_prepared(recipe, runs, plan, notes, main, show_progress, console, callbacks)
    except BaseException:
        if main and not any((run_dir / run_folder.CHECKPOINT).is_file() for _, run_dir in runs):
            run_folder.discard_unstarted([run_dir for _, run_dir in runs], None if out_existed else out)
        raise


def _train_prepared(recipe, runs, plan, notes, main: bool, show_progress: bool, console,
                    callbacks=()) -> dict[str, dict]:
    import yaml

    _apply_threads(recipe)
    device = _dist.setup(recipe)  # joins the torchrun process group, if any
    data = load_data(recipe, device)
    plan = plan if plan is not None else plan_for(recipe, len(data.class_names))
    for model in plan.models:  # timm.create_model's options (drop_path_rate, ...): in plan.json, and so in exports
        model.kwargs.update(recipe.model_kwargs)
    starting = starting_weights(recipe)
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
        with _held(run_dir):
            results[method_name] = _train_one(method_name, recipe, plan, data, run_dir, device, None,
                                              show_progress, console, callbacks)
        results[method_name]["skipped_images"] = len(data.skipped) + len(streamed_skips(data))
    return results


def _held(run_dir: Path):
    """The run folder held by this process while it trains (`run.held`); under torchrun rank 0, its writer, holds it."""
    return run_folder.held(run_dir) if _dist.is_main_process() else contextlib.nullcontext()


def _train_one(method_name, recipe, plan, data, run_dir: Path, device, state, show_progress, console,
               callbacks=()) -> dict:
    """Train one run folder; its caller holds it (`_held`)."""
    from clcli import methods

    main = _dist.is_main_process()  # under torchrun, rank 0 alone writes the run folder
    info = files.read_json(run_dir / "run.json", "run file") if main else {}
    trackers = start_tracking(method_name, recipe, plan, run_dir, info, state, console) if main else tracking.NONE
    if trackers.ids():
        info["tracking"] = {**info.get("tracking", {}), **trackers.ids()}  # --resume continues these runs
    _set_status(info, "running", run_dir, main)
    try:
        method = _build_method(methods.get(method_name), recipe, plan, data, device, state)
        summary = fit(method, data, recipe, run_dir, start_state=state, show_progress=show_progress,
                      console=console, trackers=trackers, callbacks=callbacks)
    except BaseException as e:
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        trackers.close(status)
        try:
            _set_status(info, status, run_dir, main)
        except ClcliError:  # a full disk: the error being raised says so; run.json keeps "running"
            pass
        if is_out_of_memory(e):
            raise _out_of_memory(e, device, plan, recipe, run_dir) from None
        raise
    status = summary.get("status", "finished")  # a part that ended the run may say how (a pruned trial)
    info.update(status=status, epochs=summary["epochs"], test_acc=summary["test_acc"],
                **{k: summary[k] for k in ("test_top5", "val_acc", "ema_test_acc", "best", "stopped_early", "per_class")
                   if k in summary})
    met = streamed_skips(data)  # met while streaming: added to what loading found
    if met and main:
        known = {s["image"] for s in info["data"]["skipped_images"]}
        info["data"]["skipped_images"] += [s for s in met if s["image"] not in known]
    if trackers:
        from clcli._report import results_markdown

        trackers.finish(results_markdown(info))
        trackers.close("finished")  # ended normally, pruned or not
    _set_status(info, status, run_dir, main)
    if main:
        from clcli.plots import run_curves_png

        run_curves_png([run_dir], run_dir / "curves.png")  # the end-of-run picture: losses and accuracy per epoch
    return summary


def _build_method(method_cls, recipe, plan, data, device, state):
    """The cohort as planned, on the device, with the method around it; a fresh start checks that every network
    runs at the input size first."""
    import torch

    from clcli import methods

    # Starting weights only matter for a fresh start: a checkpoint replaces them (and needs no download).
    cohort = build_cohort(plan, num_classes=len(data.class_names), seed=recipe.train.seed,
                          with_mkb=method_cls.uses_mkb, fuse=recipe.cl.fuse, shared_transfer=method_cls.shared_transfer,
                          pretrained=recipe.pretrained and state is None,
                          weights=recipe.weights if state is None else None)
    cohort.to(device)
    if state is None:  # a fresh start; a resumed run has run already
        check_networks_run(cohort, device)
    if recipe.train.channels_last:
        cohort.to(memory_format=torch.channels_last)
    if method_cls.needs_teacher:  # kd, fitnets: network 0 is the frozen teacher
        from ._teacher import load_teacher

        load_teacher(cohort.networks[0], recipe.kd.teacher, cohort.names[0], method_cls.name)
    method = methods.create(method_cls.name, cohort, recipe)
    if recipe.train.grad_checkpointing:  # after the method has hooked in what it records
        enable_grad_checkpointing(cohort, device)
    if recipe.train.compile:
        compile_networks(cohort)
    return method


def _set_status(info: dict, status: str, run_dir: Path, main: bool) -> None:
    info["status"] = status
    if main:
        files.write_json(run_dir / "run.json", info)


def _out_of_memory(e: BaseException, device, plan, recipe, run_dir: Path) -> ClcliError:
    checkpoint = run_dir / run_folder.CHECKPOINT
    kept = (f"the last checkpoint is kept in {checkpoint}" if checkpoint.is_file()
            else "no epoch had finished, so nothing was kept")
    return ClcliError(f"out of memory on {device} training {' + '.join(plan.names)} at train.batch_size "
                      f"{recipe.train.batch_size} ({one_line(e, 200)}); {kept}; lower train.batch_size, split each "
                      f"step with train.accumulate, or turn on train.grad_checkpointing (and train.mixed_precision "
                      f"on a GPU)")


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
    with _held(run_dir):  # before the data is loaded: a run another process trains is one line at once
        started_with, now = info.get("processes"), _dist.current().world
        if started_with is not None and started_with != now and console is not None:
            console.print(f"[yellow]note:[/] {run_dir} was trained with {started_with} process"
                          f"{'es' if started_with != 1 else ''} and resumes with {now}: training continues "
                          f"correctly, but the result will not be bit-exact with an uninterrupted run",
                          highlight=False, soft_wrap=True)
        data = load_data(recipe, device)
        state = run.state(map_location=device) if (run_dir / run_folder.CHECKPOINT).exists() else None
        return {method_name: _train_one(method_name, recipe, plan, data, run_dir, device, state, show_progress,
                                        console)}


def _apply_threads(recipe) -> None:
    import torch

    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
