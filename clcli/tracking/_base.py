"""What every tracker is given (`Context`) and what it does (`Tracker`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Context:
    """One run folder as the trackers see it."""
    run_dir: Path
    name: str                           # the run's name in the tracker
    labels: list[str]                   # the networks' labels (metric names begin with them)
    hparams: dict[str, object]          # the resolved recipe, flat (dotted keys)
    texts: dict[str, str]               # logged once as text: the MKB plan, the recipe
    project: str | None = None          # W&B project / MLflow experiment (None: their variables, else "clcli")
    entity: str | None = None           # W&B entity
    group: str | None = None            # `clcli compare`: W&B group, MLflow parent run
    previous: dict = field(default_factory=dict)  # this tracker's ids kept in run.json by an earlier session
    resumed: bool = False
    kept_step: int = 0                  # resuming: the last step metrics.jsonl keeps; replayed steps follow it


class Tracker:
    """One experiment tracker for one run. `replays`: after a resume it discards what it had logged past the
    checkpoint and takes the replayed steps again (TensorBoard's purge_step); the others keep what they hold and are
    not sent those steps twice."""
    name = ""
    replays = False

    def ids(self) -> dict:
        """What run.json keeps so that a resumed run continues the same logged run."""
        return {}

    def log(self, step: int, scalars: dict[str, float]) -> None:
        raise NotImplementedError

    def finish(self, table: str) -> None:
        """The final table (markdown)."""

    def close(self, status: str) -> None:
        """status: finished, interrupted or failed."""
