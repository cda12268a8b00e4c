"""Training: `train(recipe, out)` runs every method of a recipe on its data and writes one run folder per method.

Public API: `train`, `resume`, `fit` (the loop), `Callback` (a part of a run: what happens at a step's or an epoch's
end), `train_step`, `Optimisation`, `Interrupted` and `interrupt_signals` (SIGINT, SIGTERM and SIGHUP raise
`Interrupted` inside it; `as_interrupted` makes a plain KeyboardInterrupt one), `read_plan`; re-exported for
convenience: `load_data` (clcli.data), `evaluate` (clcli.evaluation), `build_cohort` and `Cohort` (clcli.cohort).
"""
from clcli.cohort import Cohort, build_cohort
from clcli.data import Data, LoadedData, load_data
from clcli.evaluation import evaluate

from ._callbacks import Callback, EpochEnd, Loop, Window
from ._dist import resolve_device
from ._interrupt import Interrupted, as_interrupted, interrupt_signals
from ._loop import fit
from ._optim import Optimisation, mixed_precision, param_groups, speed_settings
from ._plan import read_plan
from ._run import resume, train
from ._step import train_step

__all__ = ["train", "resume", "fit", "Callback", "Loop", "EpochEnd", "Window", "train_step", "Optimisation",
           "Interrupted", "as_interrupted", "interrupt_signals", "read_plan", "param_groups", "mixed_precision",
           "speed_settings", "resolve_device", "load_data", "evaluate", "build_cohort", "Cohort", "Data",
           "LoadedData"]
