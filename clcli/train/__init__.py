"""Training: `train(recipe, out)` runs every method of a recipe on its data and writes one run folder per method.

Public API: `train`, `resume`, `load_data`, `evaluate`, `build_cohort`, `Cohort`.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

from clcli import _io
from clcli.errors import ClcliError

from . import _run
from ._cohort import Cohort, build_cohort
from ._loop import Data, evaluate, fit, resolve_device

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


def load_data(recipe, device) -> Data:
    """Decode both splits once into uint8 tensors (cached on disk) and move them to the training device."""
    from clcli.data import channel_stats, load_image_tensors

    cfg = recipe.data
    source = _data_source(cfg.source)
    common = dict(config=cfg.config, image_column=cfg.image_column, label_column=cfg.label_column,
                  image_size=cfg.image_size)
    train = load_image_tensors(source, cfg.train_split, limit=cfg.train_limit, **common)
    test = load_image_tensors(source, cfg.test_split, limit=cfg.test_limit, **common)
    if cfg.normalize == "dataset":
        mean, std = channel_stats(train.images)
    elif cfg.normalize == "imagenet":
        mean, std = IMAGENET_MEAN[: train.images.shape[1]], IMAGENET_STD[: train.images.shape[1]]
    else:
        mean, std = (0.0,) * train.images.shape[1], (1.0,) * train.images.shape[1]
    return Data(train.images.to(device), train.labels.to(device), test.images.to(device), test.labels.to(device),
                list(train.class_names), tuple(mean), tuple(std))


def _plan_for(recipe, num_classes: int, plan_path: str | None):
    from clcli import probe

    if plan_path:
        raw = _run.read_json(Path(plan_path))
        plan = probe.Plan.from_dict(raw)
        if plan.names != list(recipe.models):
            recipe.models = plan.names  # the plan decides which networks are trained
        return plan
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
    out = Path(out)
    runs = _run_dirs(recipe, out)
    for _, run_dir in runs:
        _run.prepare(run_dir, resume=False, force=force)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    device = resolve_device(recipe.train.device)
    data = load_data(recipe, device)
    plan = _plan_for(recipe, len(data.class_names), plan_path)
    results = {}
    for method_name, run_dir in runs:
        _io.write_text(run_dir / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        _io.write_json(run_dir / "plan.json", plan.to_dict())
        info = {"format": _run.RUN_FORMAT, "method": method_name, "models": plan.names,
                "class_names": data.class_names, "mean": list(data.mean), "std": list(data.std),
                "input_size": list(plan.input_size), "status": "running", "versions": _versions()}
        _io.write_json(run_dir / "run.json", info)
        results[method_name] = _train_one(method_name, recipe, plan, data, run_dir, device, None, show_progress,
                                          console)
    return results


def _train_one(method_name, recipe, plan, data, run_dir: Path, device, state, show_progress, console) -> dict:
    import torch

    from clcli import methods

    method_cls = methods.METHODS[method_name]
    cohort = build_cohort(plan, num_classes=len(data.class_names), seed=recipe.train.seed,
                          with_mkb=method_cls.uses_mkb, fuse=recipe.cl.fuse,
                          shared_transfer=method_cls.shared_transfer)
    cohort.to(device)
    if recipe.train.channels_last:
        cohort.to(memory_format=torch.channels_last)
    info = _run.read_json(run_dir / "run.json")
    try:
        method = methods.create(method_name, cohort, recipe)  # may refuse (e.g. kd without a teacher)
        if recipe.train.compile:
            for net in cohort.networks:
                net.compile()
        summary = fit(method, data, recipe, run_dir, start_state=state, show_progress=show_progress,
                      console=console)
    except BaseException as e:
        info["status"] = "failed" if isinstance(e, ClcliError) else "interrupted"
        _io.write_json(run_dir / "run.json", info)
        raise
    info.update(status="finished", epochs=summary["epochs"], test_acc=summary["test_acc"])
    _io.write_json(run_dir / "run.json", info)
    return summary


def resume(run_dir: str | Path, *, show_progress: bool = True, console=None) -> dict[str, dict]:
    """Continue the run(s) in `run_dir` from their last checkpoint; finished runs are left as they are."""
    from clcli import probe, recipes

    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        subruns = sorted(p.parent for p in run_dir.glob("*/run.json"))
        if not subruns:
            raise ClcliError(f"{run_dir} is not a clcli run folder (no run.json)")
        results = {}
        for sub in subruns:
            results.update(resume(sub, show_progress=show_progress, console=console))
        return results
    info = _run.read_json(run_dir / "run.json")
    recipe = recipes.from_dict(_load_yaml(run_dir / "recipe.yaml"), str(run_dir / "recipe.yaml"))
    plan = probe.Plan.from_dict(_run.read_json(run_dir / "plan.json"))
    method_name = info["method"]
    if info.get("status") == "finished":
        return {method_name: {"epochs": info["epochs"], "test_acc": info["test_acc"]}}
    device = resolve_device(recipe.train.device)
    data = load_data(recipe, device)
    ckpt = run_dir / _run.CHECKPOINT
    state = _run.load_checkpoint(ckpt, map_location=device) if ckpt.exists() else None
    return {method_name: _train_one(method_name, recipe, plan, data, run_dir, device, state, show_progress,
                                    console)}


def _load_yaml(path: Path) -> dict:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ClcliError(f"missing {path}") from None


__all__ = ["train", "resume", "load_data", "evaluate", "build_cohort", "Cohort", "Data", "resolve_device"]
