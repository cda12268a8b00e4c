"""Training: `train(recipe, out)` runs every method of a recipe on its data and writes one run folder per method.

Public API: `train`, `resume`, `load_data`, `evaluate`, `build_cohort`, `Cohort`.
"""
from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

from clcli import _io
from clcli.errors import ClcliError

from . import _dist, _run
from ._cohort import Cohort, build_cohort, compile_networks
from ._loop import Data, evaluate, fit, resolve_device, streamed_skips

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _data_source(source: str) -> str:
    if source.startswith("builtin:"):
        from clcli.data import QUICKSTART_DIR

        name = source.split(":", 1)[1]
        if name != "quickstart":
            raise ClcliError(f"unknown built-in dataset '{name}' (available: quickstart)")
        return str(QUICKSTART_DIR)
    return source


@dataclass
class LoadedData(Data):
    """The decoded data plus what loading it decided: where the evaluation images come from (in words), the
    unreadable images left out ({"image", "reason", "split"}) and notes for the user."""

    evaluation: str = ""
    skipped: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def load_data(recipe, device) -> LoadedData:
    """Decode the training and evaluation images once into uint8 tensors (cached on disk) and move them to the
    training device. Evaluation images: `data.val_source` if set, else the `test_split`, else a 'validation' split,
    else a stratified part of the training split held out with `data.val_seed`. Class names come from the training
    split; the evaluation labels are mapped onto them by name."""
    from clcli.data import ImageTensors, SplitNotFound, load_image_tensors

    cfg = recipe.data
    if not cfg.source:
        raise ClcliError(f"recipe '{recipe.name}' names no dataset; pass --data FOLDER (an image folder "
                         f"class_name/*.jpg, a folder of parquet/arrow files, or a hub id)")
    source = _data_source(cfg.source)
    if cfg.stream:  # images stay on disk, decoded batch by batch in DataLoader workers (ImageNet)
        from ._data import load_stream

        return load_stream(recipe, source, device, LoadedData)
    # Images are decoded at the size the networks are planned for (photos of any size become input_size squares),
    # unless data.image_size says otherwise.
    image_size = cfg.image_size if cfg.image_size is not None else recipe.input_size
    common = dict(image_column=cfg.image_column, label_column=cfg.label_column, image_size=image_size)
    train = load_image_tensors(source, cfg.train_split, config=cfg.config,
                               limit=None if cfg.folds else cfg.train_limit, **common)
    if cfg.folds:  # one predefined fold of the training split (STL-10); train_limit applies within the fold
        from ._data import select_fold

        train = select_fold(train, recipe, source)
    notes = []
    if cfg.val_source:
        test = load_image_tensors(_data_source(cfg.val_source), None, limit=cfg.test_limit, **common)
        evaluation, eval_split = f"the folder {cfg.val_source}", "validation"
    else:
        try:
            test, eval_split = evaluation_split(source, cfg, **common)
            evaluation = f"split '{eval_split}'"
            if eval_split != cfg.test_split:
                notes.append(f"no '{cfg.test_split}' split in {cfg.source}: evaluating on its '{eval_split}' split")
        except SplitNotFound:
            train, test = _hold_out(train, cfg)
            evaluation, eval_split = (f"{len(test)} images held out of split '{cfg.train_split}' "
                                      f"({cfg.val_fraction:.0%} of each class, seed {cfg.val_seed})"), "held-out"
            notes.append(f"no '{cfg.test_split}' or 'validation' split in {cfg.source}: holding out "
                         f"{cfg.val_fraction:.0%} of each class for validation (stratified, seed "
                         f"{cfg.val_seed}): {len(train)} training, {len(test)} validation images")
    labels = on_classes(test.labels, test.class_names, train.class_names,
                        what=f"the evaluation images ({evaluation})", lacking="the training images lack")
    test = ImageTensors(test.images, labels, list(train.class_names), test.skipped)
    skipped = ([dict(s, split=cfg.train_split) for s in train.skipped]
               + [dict(s, split=eval_split) for s in test.skipped])
    if skipped:
        shown = "; ".join(f"{s['image']}: {s['reason']}" for s in skipped[:10])
        more = f"; and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        notes.append(f"skipped {len(skipped)} unreadable image{'s' if len(skipped) > 1 else ''}: {shown}{more}")
    mean, std = normalization(recipe, channels=train.images.shape[1], train_images=train.images)
    return LoadedData(train.images.to(device), train.labels.to(device), test.images.to(device),
                      test.labels.to(device), list(train.class_names), mean, std, evaluation, skipped,
                      notes)


def normalization(recipe, *, channels: int, train_images=None) -> tuple[tuple, tuple]:
    """(mean, std) per channel for `data.normalize`: the training images' own statistics (`dataset`, in memory only),
    ImageNet's, the first model's pretrained config (3 values: grayscale is repeated to RGB before normalising), or
    none."""
    kind = recipe.data.normalize
    if kind == "dataset":
        from clcli.data import channel_stats

        mean, std = channel_stats(train_images)
    elif kind == "imagenet":
        mean, std = IMAGENET_MEAN[:channels], IMAGENET_STD[:channels]
    elif kind == "pretrained":
        from clcli.models import pretrained_config

        pretrained = pretrained_config(recipe.models[0])
        mean, std = pretrained["mean"], pretrained["std"]
    else:
        mean, std = (0.0,) * channels, (1.0,) * channels
    return tuple(mean), tuple(std)


def _hold_out(train, cfg):
    """(training part, held-out part) of a decoded split, stratified by class; test_limit applies to the held-out."""
    from clcli.data import ImageTensors, stratified_holdout

    keep, held = stratified_holdout(train.labels, cfg.val_fraction, cfg.val_seed)
    if cfg.test_limit is not None:
        held = held[: cfg.test_limit]
    names = list(train.class_names)
    return (ImageTensors(train.images[keep], train.labels[keep], names, train.skipped),
            ImageTensors(train.images[held], train.labels[held], names))


def evaluation_split(source: str, cfg, **common):
    """(decoded images, split name) of the data's evaluation split: `cfg.test_split`, else 'validation'. Raises
    SplitNotFound (naming the splits there are) when the data has neither."""
    from clcli.data import SplitNotFound, load_image_tensors

    kwargs = dict(common, config=cfg.config, limit=cfg.test_limit)
    try:
        return load_image_tensors(source, cfg.test_split, **kwargs), cfg.test_split
    except SplitNotFound as e:
        if "validation" not in e.available:
            raise
    return load_image_tensors(source, "validation", **kwargs), "validation"


def on_classes(labels, names: list[str], onto: list[str], *, what: str, lacking: str):
    """`labels` (numbered by `names`) re-numbered by class name onto the class list `onto`: an evaluation set may
    lack some classes or list them in another order. A class `onto` does not have is an error:
    "{what} have classes {lacking}: ..."."""
    import torch

    if list(names) == list(onto):
        return labels
    index = {name: i for i, name in enumerate(onto)}
    unknown = [name for name in names if name not in index]
    if unknown:
        raise ClcliError(f"{what} have classes {lacking}: {', '.join(unknown[:5])}")
    return torch.tensor([index[name] for name in names], dtype=torch.int64, device=labels.device)[labels]


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

    plan = probe.Plan.from_dict(_run.read_json(Path(plan_path)))
    height, width = plan.input_size
    if height != width:
        raise ClcliError(f"{plan_path} plans a {height}x{width} input; recipes train on square inputs")
    changed = []
    for key, planned, current in (("models", plan.names, list(recipe.models)), ("input_size", height,
                                  recipe.input_size), ("stem", plan.stem, recipe.stem),
                                  ("cl.mkbs", len(plan.sites), recipe.cl.mkbs)):
        if planned != current:
            changed.append(f"{key} {current} -> {planned}")
    recipe.models, recipe.input_size, recipe.stem, recipe.cl.mkbs = plan.names, height, plan.stem, len(plan.sites)
    notes = [f"the plan {plan_path} decides: " + "; ".join(changed)] if changed else []
    return plan, notes


def _plan_for(recipe, num_classes: int):
    from clcli import probe

    return probe.plan(list(recipe.models), recipe.input_size, stem=recipe.stem, mkbs=recipe.cl.mkbs,
                      num_classes=num_classes, embedding=recipe.cl.embedding, budget=recipe.cl.budget)


def _versions() -> dict:
    import timm
    import torch

    import clcli

    return {"clcli": clcli.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def _run_dirs(recipe, out: Path) -> list[tuple[str, Path]]:
    if len(recipe.methods) == 1:
        return [(recipe.methods[0], out)]
    return [(m, out / m) for m in recipe.methods]


def train(recipe, out: str | Path, *, plan_path: str | None = None, force: bool = False,
          show_progress: bool = True, console=None) -> dict[str, dict]:
    """Train every method of `recipe`; returns {method: summary}. Each method gets its own run folder."""
    import torch
    import yaml

    from clcli import methods

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
    out = Path(out)
    runs = _run_dirs(recipe, out)
    main = _dist.is_main_process()  # under torchrun, rank 0 alone writes the run folder
    for _, run_dir in runs:
        if main:
            _run.prepare(run_dir, resume=False, force=force)
    _apply_threads(recipe)
    device = _dist.setup(recipe)  # joins the torchrun process group, if any
    data = load_data(recipe, device)
    plan = plan if plan is not None else _plan_for(recipe, len(data.class_names))
    starting = _starting_weights(recipe)
    if recipe.pretrained or recipe.weights:
        notes.append("starting weights: " + "; ".join(f"{name}: {src}" for name, src in starting.items()))
    for note in notes + data.notes:
        if console is not None:
            console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    data_info = {"train_images": len(data.train_labels), "eval_images": len(data.test_labels),
                 "evaluation": data.evaluation, "skipped_images": data.skipped}
    results = {}
    for method_name, run_dir in runs:
        if main:
            _io.write_text(run_dir / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
            _io.write_json(run_dir / "plan.json", plan.to_dict())
        info = {"format": _run.RUN_FORMAT, "method": method_name, "models": plan.names,
                "class_names": data.class_names, "mean": list(data.mean), "std": list(data.std),
                "input_size": list(plan.input_size), "data": data_info, "starting_weights": starting,
                "status": "running", "versions": _versions()}
        if main:
            _io.write_json(run_dir / "run.json", info)
        results[method_name] = _train_one(method_name, recipe, plan, data, run_dir, device, None, show_progress,
                                          console)
        results[method_name]["skipped_images"] = len(data.skipped) + len(streamed_skips(data))
    return results


def _train_one(method_name, recipe, plan, data, run_dir: Path, device, state, show_progress, console) -> dict:
    import torch

    from clcli import methods

    method_cls = methods.METHODS[method_name]
    main = _dist.is_main_process()  # under torchrun, rank 0 alone writes the run folder
    info = _run.read_json(run_dir / "run.json") if main else {}
    try:
        # Starting weights only matter for a fresh start: a checkpoint replaces them (and needs no download).
        cohort = build_cohort(plan, num_classes=len(data.class_names), seed=recipe.train.seed,
                              with_mkb=method_cls.uses_mkb, fuse=recipe.cl.fuse,
                              shared_transfer=method_cls.shared_transfer,
                              pretrained=recipe.pretrained and state is None,
                              weights=recipe.weights if state is None else None)
        cohort.to(device)
        if recipe.train.channels_last:
            cohort.to(memory_format=torch.channels_last)
        method = methods.create(method_name, cohort, recipe)  # may refuse (e.g. kd without a teacher)
        if recipe.train.compile:
            compile_networks(cohort)
        summary = fit(method, data, recipe, run_dir, start_state=state, show_progress=show_progress,
                      console=console)
    except BaseException as e:
        info["status"] = "failed" if isinstance(e, ClcliError) else "interrupted"
        if main:
            _io.write_json(run_dir / "run.json", info)
        raise
    info.update(status="finished", epochs=summary["epochs"], test_acc=summary["test_acc"])
    met = streamed_skips(data)  # met while streaming: added to what loading found
    if met and main:
        known = {s["image"] for s in info["data"]["skipped_images"]}
        info["data"]["skipped_images"] += [s for s in met if s["image"] not in known]
    if "test_top5" in summary:
        info["test_top5"] = summary["test_top5"]
    if main:
        _io.write_json(run_dir / "run.json", info)
        from clcli.plots import run_curves_png

        run_curves_png([run_dir], run_dir / "curves.png")  # the end-of-run picture: losses and accuracy per epoch
    return summary


def resume(run_dir: str | Path, *, show_progress: bool = True, console=None) -> dict[str, dict]:
    """Continue the run(s) in `run_dir` from their last checkpoint; finished runs are left as they are."""
    from clcli import probe, recipes

    run_dir = Path(run_dir)
    if (run_dir / "folds.json").is_file():  # a fold protocol folder: fold<k>/ run folders
        from ._folds import resume_folds

        return resume_folds(run_dir, train_one=train, resume_one=resume, show_progress=show_progress,
                            console=console)
    runs = _run.method_runs(run_dir)
    if runs != [run_dir]:
        results = {}
        for sub in runs:
            results.update(resume(sub, show_progress=show_progress, console=console))
        return results
    info = _run.read_json(run_dir / "run.json")
    recipe = recipes.from_dict(_load_yaml(run_dir / "recipe.yaml"), str(run_dir / "recipe.yaml"))
    plan = probe.Plan.from_dict(_run.read_json(run_dir / "plan.json"))
    method_name = info["method"]
    if info.get("status") == "finished":
        return {method_name: {"epochs": info["epochs"], "test_acc": info["test_acc"],
                              **({"test_top5": info["test_top5"]} if "test_top5" in info else {})}}
    _apply_threads(recipe)  # a resumed run keeps the thread count it was started with
    device = _dist.setup(recipe)  # joins the torchrun process group, if any
    data = load_data(recipe, device)
    ckpt = run_dir / _run.CHECKPOINT
    state = _run.load_checkpoint(ckpt, map_location=device) if ckpt.exists() else None
    return {method_name: _train_one(method_name, recipe, plan, data, run_dir, device, state, show_progress,
                                    console)}


def _apply_threads(recipe) -> None:
    import torch

    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)


def _load_yaml(path: Path) -> dict:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ClcliError(f"missing {path}") from None


__all__ = ["train", "resume", "load_data", "evaluate", "build_cohort", "Cohort", "Data", "LoadedData",
           "resolve_device"]
