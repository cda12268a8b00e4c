"""Experiment trackers: every record that goes to metrics.jsonl also goes to TensorBoard, Weights & Biases or MLflow
(`train.log` in a recipe, `--log tensorboard,wandb,mlflow` on the command line; several at once).

    tracking.check(["tensorboard"])               # before any work: a missing extra is one line with its pip command
    trackers = tracking.start(names, context)     # one run per tracker; `trackers.ids()` goes to run.json
    trackers.log(record)                          # a metrics.jsonl record, named per network: resnet18/cls, ...
    trackers.finish(table); trackers.close("finished")
    log = tracking.file_logger(info, "exported")  # `clcli export --log`, later: checked at once
    log(paths)                                    # the files, to the trackers the run logged to (MLflow)

A record's scalars are named `<network>/<part>` (`resnet18/cls`, `resnet18/metric`, `resnet18/train_acc`) and
`<network>/<key>` for an epoch record's per-network values (`resnet18/test_acc`, `.../ema_test_acc`,
`.../val_acc`, `.../best_epoch`); `lr`, `images_per_s`, `train_loss` and `epoch` as they are; the step is the
record's. A tracker that fails is reported once and dropped: metrics.jsonl stays the record.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import sys
from pathlib import Path
from typing import Callable

from clcli.errors import ClcliError, one_line

from ._base import Context, Tracker, position_of

# name -> (the module it needs, the package that brings it, its file here and class)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard", "_tensorboard", "TensorBoard"),
            "wandb": ("wandb", "wandb", "_wandb", "WandB"),
            "mlflow": ("mlflow", "mlflow-skinny", "_mlflow", "MLflow")}
# An epoch record's keys that the step record at the same step (the epoch's last) holds already.
_REPEATED = ("epoch", "lr")


def check(names: list[str]) -> None:
    """One line naming the pip command for the first tracker that is unknown or not installed."""
    for name in names:
        if name not in TRACKERS:
            raise ClcliError(f"unknown tracker '{name}'; choose from {', '.join(TRACKERS)}")
        module, package = TRACKERS[name][:2]
        try:
            missing = importlib.util.find_spec(module) is None
        except (ImportError, ValueError):  # a module set to None in sys.modules, a broken install
            missing = True
        if missing:
            raise ClcliError(f"logging to {name} needs the {package} package, which is not installed: "
                             f"pip install \"clcli[{name}]\"")


def scalars(record: dict, labels: list[str]) -> dict[str, float]:
    """A metrics.jsonl record's values as the trackers name them (see the module's docstring)."""
    out = {}
    epoch_record = record.get("type") == "epoch"
    for key, value in record.items():
        if key in ("type", "step") or (epoch_record and key in _REPEATED):
            continue
        if isinstance(value, dict):  # {network label: value}
            out.update({f"{label}/{key}": float(v) for label, v in value.items()})
            continue
        index, sep, part = key.partition("/")
        out[f"{labels[int(index)]}/{part}" if sep and index.isdigit() else key] = float(value)
    return out


def position(record: dict) -> tuple[int, int]:
    """Where a record stands in a run: its step, an epoch record after the step record of the same step."""
    return int(record.get("step", 0)), int(record.get("type") == "epoch")


class Trackers:
    """The trackers of one run, called together; a tracker whose call raises is reported once and dropped."""

    def __init__(self, trackers: list[Tracker], labels: list[str], note: Callable[[str], None] | None = None):
        self.trackers, self.labels = list(trackers), labels
        self.note = note or _stderr

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def _each(self, what: str, call: Callable[[Tracker], None], trackers=None) -> None:
        for tracker in list(self.trackers if trackers is None else trackers):
            try:
                call(tracker)
            except Exception as e:  # noqa: BLE001 - a tracker's failure (disk, server) must not stop training
                self.trackers.remove(tracker)
                self.note(f"{tracker.name} stopped logging ({what}: {one_line(e)}); training goes on, "
                          "metrics.jsonl keeps every record")

    def log(self, record: dict) -> None:
        if not self.trackers:
            return
        values, step, at = scalars(record, self.labels), int(record["step"]), position(record)
        self._each(f"step {step}", lambda t: t.log(step, values), [t for t in self.trackers if at > t.held])

    def ids(self) -> dict:
        return {t.name: t.ids() for t in self.trackers if t.ids()}

    def finish(self, table: str) -> None:
        self._each("the final table", lambda t: t.finish(table))

    def close(self, status: str) -> None:
        self._each("closing", lambda t: t.close(status))
        self.trackers = []


def _stderr(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


NONE = Trackers([], [])


def _open(name: str, ctx: Context, note) -> Tracker:
    file, cls = TRACKERS[name][2:]
    return getattr(importlib.import_module(f"{__name__}.{file}"), cls)(ctx, note)


def start(names: list[str], ctx: Context, *, note: Callable[[str], None] | None = None) -> Trackers:
    """Open each named tracker for the run in `ctx` (resuming: the same logged run, from `ctx.previous`). One that
    cannot start (no server, no disk) is reported and left out; training goes on."""
    check(names)
    trackers = Trackers([], ctx.labels, note)
    for name in names:
        previous = ctx.previous.get(name, {})
        sub = dataclasses.replace(ctx, previous=previous)
        try:
            trackers.trackers.append(_open(name, sub, trackers.note))
        except Exception as e:  # noqa: BLE001 - as a failure mid-run: reported, training goes on
            trackers.note(f"{name} could not start logging ({one_line(e)}); training goes on without it, "
                          "metrics.jsonl keeps every record")
    return trackers


def file_logger(info: dict, folder: str) -> Callable[[list[Path]], None]:
    """What logs a run folder's files (`clcli export --log`) to the trackers it logged to (`info`: its run.json):
    its MLflow run, the one tracker here that keeps files, as artifacts under `folder`. Checked at once, before the
    work that makes the files: a run not logged to MLflow, or MLflow not installed, is one line."""
    from . import _mlflow  # imports no mlflow itself

    ids = _mlflow.logged_run(info)
    check(["mlflow"])
    return functools.partial(_mlflow.log_files, ids, folder=folder)


__all__ = ["TRACKERS", "Context", "Tracker", "Trackers", "NONE", "check", "scalars", "position", "position_of", "start",
           "file_logger"]
