"""The standard parts of a run, in the order they act at a step's or an epoch's end: the networks gathered
(per-network placement), evaluation (test, then validation), the moving average, the best epoch, the plateau
schedule, the records, the display, any caller's own parts, the checkpoint; the tests' fault injection last."""
from __future__ import annotations

from clcli import tracking
from clcli.errors import ClcliError

from . import _faults
from ._best import Best
from ._callbacks import Callback
from ._checkpoint import Checkpoint
from ._display import Display
from ._dist import Dist, PerNetworkSync
from ._ema import Ema
from ._evaluation import Evaluation, Validation
from ._optim import PlateauSchedule
from ._records import Records


def standard(method, data, recipe, d: Dist, *, show_progress: bool, console, trackers: tracking.Trackers,
             extra: list[Callback] = ()) -> list[Callback]:
    cfg = recipe.train
    parts: list[Callback] = [PerNetworkSync()] if d.per_network else []
    parts.append(Evaluation())
    if getattr(data, "val_images", None) is not None:
        parts.append(Validation())
    elif cfg.keep_best:
        raise ClcliError("train.keep_best needs a validation split held out of the training images (in-memory data)")
    if cfg.ema_decay > 0:
        parts.append(Ema(method.cohort, cfg))
    if cfg.keep_best:
        parts.append(Best(method.cohort.labels, cfg.patience))
    if cfg.schedule == "plateau":
        parts.append(PlateauSchedule())
    parts += [Records(trackers), Display(show_progress, console), *extra, Checkpoint()]
    if fault := _faults.requested():
        parts.append(fault)
    return parts
