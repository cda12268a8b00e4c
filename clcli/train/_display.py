"""What a person watching sees: a live bar with the step, elapsed time, ETA and images/s, a line per network with
its loss parts and training accuracy, and a line per epoch with each network's test accuracy."""
from __future__ import annotations

from clcli.data import streamed_skips

from ._callbacks import Callback, EpochEnd, Loop, Window


class LiveProgress:
    """Rich live progress: a block that fits the terminal's width without cutting what a person watches. Its lines:
    the method and its networks; the epoch, a bar, the step N/M, the elapsed time, the ETA and images/s (the bar
    gives way first, and in a narrow terminal the numbers move to a line of their own under it); one line per
    network with its training accuracy and loss parts (each name on a line of its own above its numbers where a line
    would run past the width).

    Without a terminal (a pipe, a file, a CI log) nothing is redrawn: the block is printed once, at the end, and ends
    with a newline like any other line. (Rich's `Live` ends its last render with a newline only on a terminal, so
    there the next line printed would join it.)"""

    def __init__(self, enabled: bool, total_steps: int, label: str, console=None, epoch: str = ""):
        self.enabled = enabled
        if not enabled:
            return
        from rich.console import Console
        from rich.live import Live
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self.console, self.label = console if console is not None else Console(), label
        # The Progress keeps the step count and the speed behind the ETA; its columns draw one cell each.
        self.bar = BarColumn(bar_width=None)
        self.numbers = (MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                        TextColumn("{task.fields[status]}"))
        self.progress = Progress(console=self.console)
        self.task = self.progress.add_task(epoch, total=total_steps, status="")
        self.networks: list[tuple[str, dict[str, float], float]] = []
        redrawn = self.console.is_terminal or self.console.is_jupyter
        self.live = Live(self, console=self.console, refresh_per_second=4) if redrawn else None
        if self.live is not None:
            self.live.start()

    def __rich_console__(self, console, options):
        from rich.text import Text

        yield Text(self.label, style="bold", overflow="fold")
        yield from self._bar_lines(console, options)
        yield from self._network_lines(options.max_width)

    def _bar_lines(self, console, options):
        """`epoch 2/5 ━━━━━━━╸━━━━━━━ 46/78 0:00:04 eta 0:00:09 371 img/s` on one line while the bar keeps ten
        cells at least (forty at most), else the numbers on the line under the bar."""
        from rich.measure import Measurement
        from rich.table import Table
        from rich.text import Text

        task = self.progress.tasks[0]
        epoch = Text(task.description, style="bold")
        numbers = [column(task) for column in self.numbers]
        fixed = [Measurement.get(console, options, cell).maximum for cell in (epoch, *numbers)]
        room = options.max_width - sum(fixed) - len(fixed)
        one_line = room >= 10
        self.bar.bar_width = max(min(room if one_line else options.max_width - fixed[0] - 1, 40), 1)
        grid = Table.grid(padding=(0, 1))
        grid.add_row(epoch, self.bar(task), *(numbers if one_line else []))
        yield grid
        if not one_line:
            yield from _packed(numbers, options.max_width, " ")

    def _network_lines(self, width: int) -> list:
        """`  resnet10t  acc  36.2%  loss 1.802  metric 0.312  ver 1.998`, the columns aligned over the networks;
        where that runs past `width`, each name on a line of its own with its numbers under it (on as many lines as
        they need, never cut inside a number)."""
        from rich.cells import cell_len
        from rich.text import Text

        rows = [[label, f"acc {acc:5.1f}%", *(f"{part} {value:.3f}" for part, value in parts.items())]
                for label, parts, acc in self.networks]
        widths = [max(cell_len(row[i]) for row in rows if i < len(row))
                  for i in range(max((len(row) for row in rows), default=0))]
        rows = [[Text(c + " " * (widths[i] - cell_len(c))) for i, c in enumerate(row)] for row in rows]
        lines = [Text("  ") + Text("  ").join(row) for row in rows]
        for line in lines:
            line.rstrip()
        if all(line.cell_len <= width for line in lines):
            return lines
        return [line for label, *numbers in rows
                for line in (Text(f"  {label.plain.rstrip()}"), *_packed(numbers, width, "  ", "    "))]

    def update(self, completed: int, status: str, networks: list[tuple[str, dict[str, float], float]],
               epoch: str | None = None) -> None:
        """`status` (images/s) and `networks`: (label, {loss part: mean}, training accuracy %) per network, at a log
        window; `epoch` ("epoch 2/5") when it changes."""
        if self.enabled:
            self.networks = networks
            self.progress.update(self.task, completed=completed, status=status,
                                 **({} if epoch is None else {"description": epoch}))

    def advance(self, completed: int, epoch: str | None = None) -> None:
        """The step count, and with it the ETA, after every step; the loss parts wait for `update` at a log window
        (reading them needs a host sync, counting steps does not)."""
        if self.enabled:
            self.progress.update(self.task, completed=completed, **({} if epoch is None else {"description": epoch}))

    def log(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)

    def stop(self) -> None:
        """The live block's last state stays on screen (printed once, without a terminal), followed by a newline."""
        if not self.enabled:
            return
        if self.live is not None:
            self.live.stop()
        else:
            self.console.print(self)
        self.enabled = False


def _packed(cells: list, width: int, separator: str, indent: str = "") -> list:
    """`cells` (rich Texts) on as few lines of `width` as hold them, `separator` between two on a line, `indent`
    before each line; a cell is never cut (one wider than `width` is left for the console to fold)."""
    from rich.text import Text

    lines: list = []
    for cell in cells:
        if lines and lines[-1].cell_len + len(separator) + len(cell.plain.rstrip()) <= width:
            lines[-1].append(separator)
            lines[-1].append(cell)
        else:
            lines.append(Text(indent) + cell)
    for line in lines:
        line.rstrip()
    return lines


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
                                     * loop.steps, f"{loop.method.name}  {' + '.join(loop.cohort.labels)}",
                                     self.console, epoch=self._epoch(loop, loop.start_epoch))

    def on_step_end(self, loop: Loop, window: Window | None) -> None:
        done = (loop.epoch - loop.start_epoch) * loop.steps + loop.step + 1
        if window is None:
            self.progress.advance(done, self._epoch(loop))
            return
        labels, shown = loop.cohort.labels, {"cls": "loss", **loop.method.progress_parts}
        networks = [(labels[i], {label: window.means[f"{i}/{part}"] for part, label in shown.items()
                                 if f"{i}/{part}" in window.means}, window.accuracy[i]) for i in range(len(labels))]
        self.progress.update(done, f"{images_per_second(window.rate)} img/s", networks, self._epoch(loop))

    @staticmethod
    def _epoch(loop: Loop, epoch: int | None = None) -> str:
        return f"epoch {(loop.epoch if epoch is None else epoch) + 1}/{loop.recipe.train.epochs}"

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
