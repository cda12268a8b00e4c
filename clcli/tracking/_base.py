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
    resumed: bool = False               # a session of a run that has logged before


def position_of(steps: dict[int, set[str]]) -> tuple[int, int]:
    """A tracker's last position from the metric names it holds per step: an epoch record's are `<label>/test_acc`."""
    if not steps:
        return (0, 0)
    last = max(steps)
    return last, int(any(name.endswith("/test_acc") for name in steps[last]))


class Tracker:
    """One experiment tracker for one run. `held`: resuming, the position (step, 1 for an epoch record) of the last
    record it holds from the earlier sessions, asked of the tracker itself (a kill may have cut its last seconds);
    it is sent only the records after it: first those metrics.jsonl kept, then the run's. TensorBoard drops all it
    had (purge_step 1) and takes everything again: its `held` stays (0, 0).

    A tracker is made as `Tracker(context, note)`: it opens (resuming, continues) its run; `note(text)` tells the
    user something in one line."""
    name = ""
    held: tuple[int, int] = (0, 0)

    def ids(self) -> dict:
        """What run.json keeps so that a resumed run continues the same logged run."""
        return {}

    def log(self, step: int, scalars: dict[str, float]) -> None:
        raise NotImplementedError

    def finish(self, table: str) -> None:
        """The final table (markdown)."""

    def close(self, status: str) -> None:
        """status: finished, interrupted or failed."""
