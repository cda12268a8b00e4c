"""The fold protocol (STL-10, paper section IV-A): one training run per predefined fold, each tested on the whole test
split, and the accuracy averaged over the folds.

    <out>/recipe.yaml      the resolved recipe (data.fold: null)
    <out>/folds.json       the fold file, the status, and per method and network the accuracy of every finished
                           fold with their mean and standard deviation (rewritten after each fold)
    <out>/fold<k>/         an ordinary run folder (or one folder per method) trained on fold k only
"""
from __future__ import annotations

import copy
import statistics
from pathlib import Path

from clcli import files
from clcli import run as run_folder
from clcli.errors import ClcliError

FOLDS_FILE = run_folder.FOLDS_FILE
FOLDS_FORMAT = 1


def _fold_recipe(recipe, k: int):
    r = copy.deepcopy(recipe)
    r.data.fold = k
    return r


def _stats(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single fold)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(per_fold: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """{fold: {method: summary}} -> {method: {"folds": [k...], "test_acc": {net: mean}, "test_acc_std": {net: std},
    "test_acc_folds": {net: [acc per fold]}, and the same for test_top5 when present, "epochs"}}."""
    out: dict[str, dict] = {}
    folds = sorted(per_fold)
    methods = list(per_fold[folds[0]]) if folds else []
    for m in methods:
        done = [k for k in folds if m in per_fold[k]]
        entry: dict = {"folds": done, "epochs": per_fold[done[0]][m].get("epochs")}
        for key in ("test_acc", "test_top5"):
            if not all(key in per_fold[k][m] for k in done):
                continue
            nets = list(per_fold[done[0]][m][key])
            values = {n: [float(per_fold[k][m][key][n]) for k in done] for n in nets}
            stats = {n: _stats(v) for n, v in values.items()}
            entry[key] = {n: round(s[0], 4) for n, s in stats.items()}
            entry[f"{key}_std"] = {n: round(s[1], 4) for n, s in stats.items()}
            entry[f"{key}_folds"] = values
        out[m] = entry
    return out


def _write(out: Path, n_folds: int, fold_path: str, per_fold: dict, status: str) -> dict:
    summary = summarize(per_fold) if per_fold else {}
    files.write_json(out / FOLDS_FILE, {"format": FOLDS_FORMAT, "folds": n_folds, "fold_file": fold_path,
                                      "status": status, "finished_folds": sorted(per_fold), "results": summary})
    return summary


def train_folds(recipe, out: str | Path, *, train_one, plan_path: str | None = None, force: bool = False,
                show_progress: bool = True, console=None) -> dict[str, dict]:
    """Train `recipe` on every fold of its `data.folds` file, each in <out>/fold<k>/; returns the summary over the
    folds ({method: {"test_acc": mean, "test_acc_std": std, ...}}). `train_one(recipe, run_dir, ...)` trains one
    fold (clcli.train.train)."""
    import yaml

    from clcli.data import fold_file, read_folds, source_path

    path = fold_file(recipe.data.folds, source_path(recipe.data.source))
    n = len(read_folds(path))
    out = Path(out)
    run_folder.prepare(out, resume=False, force=force)
    files.write_text(out / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    _write(out, n, str(path), {}, "running")
    return _run_folds(recipe, out, n, str(path), {}, train_one=train_one, plan_path=plan_path,
                      show_progress=show_progress, console=console)


def _run_folds(recipe, out: Path, n: int, path: str, per_fold: dict, *, train_one, plan_path, show_progress,
               console, resume_one=None) -> dict[str, dict]:
    try:
        for k in range(n):
            if k in per_fold:
                continue
            fold_dir = out / f"fold{k}"
            if console is not None and show_progress:
                console.print(f"[bold]fold {k + 1}/{n}[/] -> {fold_dir}")
            started = (fold_dir / "run.json").is_file() or any(fold_dir.glob("*/run.json"))
            if resume_one is not None and started:
                per_fold[k] = resume_one(fold_dir, show_progress=show_progress, console=console)
            else:
                per_fold[k] = train_one(_fold_recipe(recipe, k), fold_dir, plan_path=plan_path, force=True,
                                        show_progress=show_progress, console=console)
            _write(out, n, path, per_fold, "running")
    except BaseException as e:
        _write(out, n, path, per_fold, "interrupted" if isinstance(e, KeyboardInterrupt) else "failed")
        raise
    return _write(out, n, path, per_fold, "finished")


def resume_folds(out: str | Path, *, train_one, resume_one, show_progress: bool = True, console=None):
    """Continue a fold protocol folder: finished folds are read back, started ones resumed, the rest trained."""
    out = Path(out)
    info = files.read_json(out / FOLDS_FILE, "folds file")
    if not isinstance(info.get("folds"), int):
        raise ClcliError(f"{out / FOLDS_FILE} is not a clcli folds.json (no 'folds' count)")
    recipe = run_folder.read_recipe(out / "recipe.yaml")
    return _run_folds(recipe, out, int(info["folds"]), info.get("fold_file", ""), {}, train_one=train_one,
                      plan_path=None, show_progress=show_progress, console=console, resume_one=resume_one)


__all__ = ["train_folds", "resume_folds", "summarize", "FOLDS_FILE"]
