"""What a person watching sees: a live bar with the step, elapsed time, ETA and images/s, a line per network with
its loss parts and training accuracy, and a line per epoch with each network's test accuracy."""
from __future__ import annotations

from clcli.data import streamed_skips

from ._callbacks import Callback, EpochEnd, Loop, Window


class LiveProgress:
    """Rich live progress: a bar with the epoch, step, images/s and ETA, and under it one line per network with its
    loss parts and training accuracy (one line per network never runs past a terminal's width)."""

    def __init__(self, enabled: bool, total_steps: int, label: str, console=None):
        self.enabled = enabled
        if not enabled:
            return
        from rich.console import Group
        from rich.live import Live
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=console)
        self.task = self.progress.add_task(label, total=total_steps, status="")
        self.networks: list[tuple[str, dict[str, float], float]] = []
        self.live = Live(Group(self.progress, self), console=console, refresh_per_second=4)
        self.live.start()

    def __rich__(self):
        from rich.table import Table

        grid = Table.grid(padding=(0, 2))
        for label, parts, acc in self.networks:
            grid.add_row(f"  {label}", f"acc {acc:5.1f}%", *(f"{part} {value:.3f}" for part, value in parts.items()))
        return grid

    def update(self, completed: int, status: str, networks: list[tuple[str, dict[str, float], float]]) -> None:
        """`networks`: (label, {loss part: mean}, training accuracy %) per network."""
        if self.enabled:
            self.networks = networks
            self.progress.update(self.task, completed=completed, status=status)

    def advance(self, completed: int) -> None:
        """The step count, and with it the ETA, after every step; the loss parts wait for `update` at a log window
        (reading them needs a host sync, counting steps does not)."""
        if self.enabled:
            self.progress.update(self.task, completed=completed)

    def log(self, text: str) -> None:
        if self.enabled:
            self.live.console.print(text, highlight=False)

    def stop(self) -> None:
        if self.enabled:
            self.live.stop()


def images_per_second(rate: float) -> str:
    """A rate with three significant figures at most and never "0": 1,234 / 87.5 / 0.412."""
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.1f}" if rate >= 10 else f"{rate:.3g}"


class Display(Callback):
    """The live progress and the epoch lines (rank 0, when progress is shown)."""

    def __init__(self, enabled: bool, console=None):
        self.enabled, self.console = enabled, console
        self.progress: LiveProgress | None = None
        self.reported_skips = 0

    def on_fit_start(self, loop: Loop) -> None:
        self.progress = LiveProgress(self.enabled and loop.dist.main, (loop.recipe.train.epochs - loop.start_epoch)
                                     * loop.steps, f"{loop.method.name} {'+'.join(loop.cohort.labels)}", self.console)

    def on_step_end(self, loop: Loop, window: Window | None) -> None:
        done = (loop.epoch - loop.start_epoch) * loop.steps + loop.step + 1
        if window is None:
            self.progress.advance(done)
            return
        labels, shown = loop.cohort.labels, {"cls": "loss", **loop.method.progress_parts}
        networks = [(labels[i], {label: window.means[f"{i}/{part}"] for part, label in shown.items()
                                 if f"{i}/{part}" in window.means}, window.accuracy[i]) for i in range(len(labels))]
        self.progress.update(done, f"epoch {loop.epoch + 1}/{loop.recipe.train.epochs}  "
                                   f"{images_per_second(window.rate)} img/s", networks)

    def on_epoch_end(self, loop: Loop, end: EpochEnd) -> None:
        ema = end.record.get("ema_test_acc")
        self.progress.log(f"epoch {end.epoch + 1}/{loop.recipe.train.epochs}  "
                          + "  ".join(f"{k} {v:.2f}%" for k, v in end.test_acc.items())
                          + ("  (EMA " + "  ".join(f"{v:.2f}%" for v in ema.values()) + ")" if ema else ""))
        skips = streamed_skips(loop.data)
        if len(skips) > self.reported_skips:
            first = skips[self.reported_skips]
            self.progress.log(f"skipped {len(skips) - self.reported_skips} unreadable streamed image(s) (first: "
                              f"{first['image']}: {first['reason']})")
            self.reported_skips = len(skips)
        if loop.stop:
            self.progress.log(loop.stop)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
