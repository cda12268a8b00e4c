"""`clcli compare`: every method on the same recipe and seeds, laid out like the paper's Table 2.

    <out>/runs/<method>/seed<k>/   one ordinary run folder per (method, seed): same recipe and seed, hence the same
                                   data order and initial weights; finished runs are reused, unfinished ones resumed
    <out>/runs/el/seed<k>.json     the EL accuracy of that seed's IL run
    <out>/table.md                 a row per method, each cell net1 / net2 as mean ± std over the seeds (EL: one
                                   number), then the first iteration at which each method reaches IL's final accuracy
    <out>/results.csv              one line per (method, seed, network)
    <out>/curves.png               test accuracy against iterations, per network, mean over the seeds
    <out>/per_class.md             per network, each class's test accuracy under each method, mean over the seeds

IL always runs first: it is the reference, the teacher of kd and fitnets (network 0 of the IL run of the same seed),
and the networks that EL averages.
"""
from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from clcli import files, tracking
from clcli.errors import ClcliError
from clcli.models import network_labels

LABELS = {"il": "IL", "el": "EL", "kd": "DL (1→2)", "fitnets": "HL (1→2)", "dml": "DML", "wel": "WEL",
          "mkb-solo": "MKB (w/o CL)", "cl": "CL"}
ORDER = list(LABELS)
COMPUTED = ("el",)  # rows computed from the IL runs, not trained
# How a run is executed, not what it computes: a change here does not make a finished run stale.
_IGNORED_KEYS = ("kd.teacher", "train.device", "train.threads", "train.log_every", "train.log", "train.log_project",
                 "train.log_entity", "train.log_group")


@dataclass
class RunResult:
    method: str
    seed: int
    run_dir: Path
    networks: list[str]
    test_acc: list[float]                                   # final, per network
    curve: list[tuple[int, list[float]]] = field(default_factory=list)  # (iteration, test acc per network)
    per_class: dict[str, list] | None = None                # per network: each class's accuracy (%), last evaluation


def parse_methods(text: str) -> list[str]:
    from clcli import methods

    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise ClcliError("--methods is empty")
    known = {*methods.METHODS, *COMPUTED}
    unknown = [m for m in names if m not in known]
    if unknown:
        raise ClcliError(f"unknown method '{unknown[0]}'; available: {', '.join(sorted(known))}")
    return list(dict.fromkeys(names))


def _check_same_recipe(recipe, run) -> None:
    """A finished or unfinished run is reused only if it was trained with this recipe. Keys that do not change what
    is computed (_IGNORED_KEYS) and the sections of other methods (a CL variant's `cl.*` for an IL run) may differ."""
    from clcli import methods, recipes

    run_dir, stored = run.path, run.recipe
    old, new = recipes.flat(stored), recipes.flat(recipe)
    every_method_section = {s for m in methods.METHODS.values() for s in m.recipe_sections}
    foreign = every_method_section - set(methods.get(run.method).recipe_sections)
    for key in sorted(set(old) | set(new)):
        if key.split(".")[0] in foreign or key.startswith("tune."):  # the search space of `clcli tune`: not trained
            continue
        if key not in _IGNORED_KEYS and old.get(key) != new.get(key):
            raise ClcliError(f"{run_dir} was trained with {key}={old.get(key)!r}, this comparison asks for "
                             f"{new.get(key)!r}; give another --out or delete that folder")


def _needs_teacher(method: str) -> bool:
    from clcli import methods

    return method in methods.METHODS and methods.METHODS[method].needs_teacher


def _run_recipe(base, method: str, seed: int, teacher: Path, group: str | None = None):
    from clcli import recipes

    r = recipes.from_dict(base.to_dict())
    r.methods, r.train.seed, r.train.log_group = [method], seed, group
    if _needs_teacher(method):
        r.kd.teacher = str(teacher.resolve())
    return r


def _ensure_run(recipe, run_dir: Path, progress: "_GridProgress") -> str:
    """Train, resume or reuse one run folder; returns what was done."""
    from clcli import train as train_lib
    from clcli.run import Run

    if (run_dir / "run.json").is_file():
        run = Run.open(run_dir)
        _check_same_recipe(recipe, run)
        if run.finished:
            return "reused"
        train_lib.resume(run_dir, show_progress=progress.enabled, console=progress.console)
        return "resumed"
    # No run.json: whatever is there was left by an earlier comparison before its run started.
    train_lib.train(recipe, run_dir, force=True, show_progress=progress.enabled, console=progress.console)
    return "trained"


def _read_run(method: str, seed: int, run_dir: Path) -> RunResult:
    from clcli.run import Run

    run = Run.open(run_dir)
    info = run.info
    names = network_labels(list(info["models"]))
    curve = [(int(r["step"]), [float(r["test_acc"][n]) for n in names])
             for r in run.metrics() if r.get("type") == "epoch"]
    per_class = {n: info["per_class"][n]["accuracy"] for n in names} if "per_class" in info else None
    return RunResult(method, seed, run_dir, names, [float(info["test_acc"][n]) for n in names], curve, per_class)


def el_accuracy(run_dir: str | Path) -> float:
    """EL accuracy (%) of a finished run's networks (the IL run, for the paper's EL row) on its test split:
    `evaluation.ensemble_accuracy`, their softmax probabilities averaged. (The paper adds a trainable FC layer on the
    combined predictions; averaging the probabilities is the parameter-free version.)"""
    import torch

    from clcli import evaluation
    from clcli.data import load_data
    from clcli.run import Run

    run = Run.open(run_dir)
    data = load_data(run.recipe, torch.device("cpu"))
    return evaluation.ensemble_accuracy(list(run.cohort().networks), data.test_images, data.test_labels,
                                        run.info["mean"], run.info["std"])


def _ensemble(il_dir: Path, cache: Path) -> float:
    stamp = (il_dir / "checkpoint.pt").stat().st_mtime_ns
    if cache.is_file():
        try:
            saved = files.read_json(cache, "ensemble cache")
        except ClcliError:  # a damaged cache is measured again and rewritten
            saved = {}
        if saved.get("il_checkpoint_mtime_ns") == stamp and isinstance(saved.get("test_acc"), (int, float)):
            return float(saved["test_acc"])
    acc = el_accuracy(il_dir)
    files.write_json(cache, {"il_run": str(il_dir), "il_checkpoint_mtime_ns": stamp, "test_acc": acc})
    return acc


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _first_reach(curve: list[tuple[int, list[float]]], network: int, target: float) -> int | None:
    return next((step for step, accs in curve if accs[network] >= target), None)


def _rows(order: list[str], runs: dict[str, list[RunResult]], el: list[float], names: list[str],
          il_final: list[float]) -> tuple[list[tuple[str, str]], list[tuple[str, list[str]]]]:
    acc_rows, reach_rows = [], []
    for m in order:
        if m == "el":
            acc_rows.append((LABELS[m], _mean_std(el)))
            continue
        rs = runs[m]
        acc_rows.append((LABELS.get(m, m), " / ".join(_mean_std([r.test_acc[i] for r in rs])
                                                      for i in range(len(names)))))
        cells = []
        for i in range(len(names)):
            hits = [s for s in (_first_reach(r.curve, i, il_final[i]) for r in rs) if s is not None]
            cells.append(f"{statistics.mean(hits):.0f} ({len(hits)}/{len(rs)})" if hits else f"never (0/{len(rs)})")
        reach_rows.append((LABELS.get(m, m), cells))
    return acc_rows, reach_rows


def label_note(methods: list[str], code: str = "") -> str | None:
    """Which clcli method each of the paper's labels in the table is ("DL (1→2) = kd"), or None when every label is
    the method's own name."""
    named = [f"{LABELS[m]} = {code}{m}{code}" for m in methods if m in LABELS and LABELS[m] != m.upper()]
    return "the paper's labels as clcli methods: " + ", ".join(named) if named else None


def _dataset_name(source: str | None) -> str:
    """The dataset as a report names it: a local folder by its name (never a path of the machine that ran it), a hub
    id or built-in dataset as it is."""
    if not source:
        return "-"
    path = Path(source).expanduser()
    if path.is_absolute() or path.exists():
        return f"{path.name} (a local folder)"
    return source


def _table_md(recipe, seeds: list[int], names: list[str], il_final: list[float], acc_rows, reach_rows,
              order: list[str]) -> str:
    lines = [f"# {recipe.name}: test accuracy (%)", "",
             f"Mean ± std over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); "
             f"{recipe.train.epochs} epochs, dataset {_dataset_name(recipe.data.source)}.", "",
             f"| Method | {' / '.join(names)} |", "| --- | --- |"]
    lines += [f"| {label} | {cell} |" for label, cell in acc_rows]
    notes = []
    if "el" in order:
        notes.append("EL: the IL networks' averaged softmax probabilities, one number.")
    if any(_needs_teacher(m) for m in order):
        notes.append(f"DL/HL: network 1 ({names[0]}) is the IL network of the same seed, frozen as the teacher.")
    if label_note(order):
        note = label_note(order, code="`")
        notes.append(note[0].upper() + note[1:] + ".")
    if notes:
        lines += [""] + notes
    lines += ["", "## Iterations to reach IL's final accuracy", "",
              "IL's final accuracy (mean over seeds): "
              + ", ".join(f"{n} {a:.2f}" for n, a in zip(names, il_final))
              + ". Each cell: the first evaluated iteration at which the network reaches it, mean over the seeds "
                "that do (how many do).", "",
              f"| Method | {' | '.join(names)} |", "|" + " --- |" * (len(names) + 1)]
    lines += [f"| {label} | {' | '.join(cells)} |" for label, cells in reach_rows]
    return "\n".join(lines) + "\n"


def _results_csv(runs: dict[str, list[RunResult]], el: dict[int, float], il_final: list[float]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "seed", "network", "test_acc", "iterations", "reach_il_iteration"])
    for m, rs in runs.items():
        for r in rs:
            last = r.curve[-1][0] if r.curve else ""
            for i, n in enumerate(r.networks):
                reach = _first_reach(r.curve, i, il_final[i])
                w.writerow([m, r.seed, n, f"{r.test_acc[i]:.3f}", last, "" if reach is None else reach])
    for seed, acc in el.items():
        w.writerow(["el", seed, "ensemble", f"{acc:.3f}", "", ""])
    return buf.getvalue()


def _per_class_md(recipe, runs: dict[str, list[RunResult]], names: list[str], class_names: list[str]) -> str:
    """Per network, each class's test accuracy under each method, mean over the seeds (runs from before per-class
    results were kept: "-")."""
    lines = [f"# {recipe.name}: per-class test accuracy (%)", "",
             "Each method's accuracy on each class at its last evaluation, mean over the seeds; per network.", ""]
    methods = list(runs)
    for i, name in enumerate(names):
        lines += [f"## {name}", "", "| class | " + " | ".join(LABELS.get(m, m) for m in methods) + " |",
                  "|---" * (len(methods) + 1) + "|"]
        for k, cls in enumerate(class_names):
            cells = []
            for m in methods:
                values = [r.per_class[name][k] for r in runs[m] if r.per_class and r.per_class[name][k] is not None]
                cells.append(f"{statistics.mean(values):.2f}" if values else "-")
            lines.append(f"| {cls} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def compare(recipe, methods: list[str], seeds: int, out: str | Path, *, show_progress: bool = True,
            console=None) -> dict:
    """Run (or reuse) every (method, seed) of the grid and write table.md, results.csv, curves.png and per_class.md
    under `out`; with train.log, every run goes to the trackers in one group (W&B group, MLflow parent run; for
    TensorBoard, `tensorboard --logdir <out>/runs` shows each run's tb/ as a subfolder). Returns the table rows and
    the paths written."""
    from clcli.plots import compare_curves_png
    from clcli.run import Run
    from clcli.train import as_interrupted, interrupt_signals

    if seeds < 1:
        raise ClcliError(f"--seeds must be at least 1, got {seeds}")
    out = Path(out)
    files.check_output_dir(out, "report folder")
    tracking.check(recipe.train.log)  # a missing extra: one line before any run
    # the grid's runs side by side in the trackers
    group = recipe.train.log_group or (f"compare-{out.resolve().name}" if recipe.train.log else None)
    seed_list = [recipe.train.seed + k for k in range(seeds)]
    trained = ["il"] + [m for m in methods if m != "il" and m not in COMPUTED]
    order = sorted(dict.fromkeys(["il", *methods]), key=lambda m: ORDER.index(m) if m in ORDER else len(ORDER))
    grid = [(m, s) for m in trained for s in seed_list]
    total = len(grid) + (len(seed_list) if "el" in methods else 0)
    progress = _GridProgress(show_progress, total, console)
    runs: dict[str, list[RunResult]] = {m: [] for m in trained}
    el: dict[int, float] = {}
    with interrupt_signals():  # Ctrl-C, SIGTERM or SIGHUP, in a run or in the EL measurement: one line
        try:
            for m, s in grid:
                run_dir = out / "runs" / m / f"seed{s}"
                progress.start(f"{m} seed {s} → {run_dir}")
                run_recipe = _run_recipe(recipe, m, s, out / "runs" / "il" / f"seed{s}", group)
                done = _ensure_run(run_recipe, run_dir, progress)
                runs[m].append(_read_run(m, s, run_dir))
                progress.advance(f"{m} seed {s}: {done}, test acc "
                                 + " / ".join(f"{a:.2f}" for a in runs[m][-1].test_acc))
            if "el" in methods:
                for s in seed_list:
                    el[s] = _ensemble(out / "runs" / "il" / f"seed{s}", out / "runs" / "el" / f"seed{s}.json")
                    progress.advance(f"el seed {s}: test acc {el[s]:.2f}")
        except KeyboardInterrupt as e:  # the same command continues the grid
            stopped = as_interrupted(e)
            stopped.hint = "run the same `clcli compare` again to continue (finished runs are reused, this one resumed)"
            raise stopped from None
    names = runs["il"][0].networks
    il_final = [statistics.mean(r.test_acc[i] for r in runs["il"]) for i in range(len(names))]
    acc_rows, reach_rows = _rows(order, runs, list(el.values()), names, il_final)
    table = _table_md(recipe, seed_list, names, il_final, acc_rows, reach_rows, order)
    paths = {"table": out / "table.md", "results": out / "results.csv", "curves": out / "curves.png",
             "per_class": out / "per_class.md"}
    files.write_text(paths["table"], table)
    files.write_text(paths["results"], _results_csv(runs, el, il_final))
    class_names = list(Run.open(runs["il"][0].run_dir).info["class_names"])
    files.write_text(paths["per_class"], _per_class_md(recipe, runs, names, class_names))
    compare_curves_png(paths["curves"], {m: [r.curve for r in rs] for m, rs in runs.items()}, LABELS, names, il_final)
    return {"networks": names, "seeds": seed_list, "rows": acc_rows, "label_note": label_note(order),
            "reach": reach_rows, "il_final": il_final, "paths": paths}


class _GridProgress:
    """Runs done / total over the grid, as a rich rule before each run; the run itself shows the loop's own live bar
    (rich has one live display at a time, so the grid is not a second bar)."""

    def __init__(self, enabled: bool, total: int, console=None):
        self.enabled, self.total, self.done = enabled, total, 0
        if enabled and console is None:
            from rich.console import Console

            console = Console()
        self.console = console

    def start(self, what: str) -> None:
        if self.enabled:
            self.console.rule(f"[bold]compare[/] {self.done}/{self.total} runs done · {what}", align="left")

    def advance(self, line: str) -> None:
        self.done += 1
        if self.enabled:
            self.console.print(f"{line}  [dim]({self.done}/{self.total})[/]", highlight=False)
