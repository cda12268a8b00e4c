"""The standard parts of a run, in the order they act at a step's or an epoch's end: the networks gathered
(per-network placement), evaluation, the moving average, the best epoch, the plateau schedule, the records, the
display, the checkpoint; then any caller's own parts; the test's fault injection last."""
from __future__ import annotations

from clcli import tracking

from . import _faults
from ._best import Best
from ._callbacks import Callback
from ._checkpoint import Checkpoint
from ._display import Display
from ._dist import Dist, PerNetworkSync
from ._ema import Ema
from ._evaluation import Evaluation
from ._optim import PlateauSchedule
from ._records import Records


def standard(method, data, recipe, d: Dist, *, show_progress: bool, console, trackers: tracking.Trackers,
             extra: list[Callback] = ()) -> list[Callback]:
    cfg = recipe.train
    parts: list[Callback] = [PerNetworkSync()] if d.per_network else []
    parts.append(Evaluation())
    if cfg.ema_decay > 0:
        parts.append(Ema(method.cohort, cfg))
    if cfg.keep_best:
        parts.append(Best(method.cohort.labels, cfg.patience, data))
    if cfg.schedule == "plateau":
        parts.append(PlateauSchedule())
    parts += [Records(trackers), Display(show_progress, console), *extra, Checkpoint()]
    if fault := _faults.requested():
        parts.append(fault)
    return parts
