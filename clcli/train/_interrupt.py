"""Ctrl-C (SIGINT), SIGTERM (what schedulers send) and SIGHUP (a closed terminal) stop training the same way: the
run is marked `interrupted` and one line says where it stopped and how to continue."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """Training stopped by a signal. `where` ("epoch E step S") is filled in by the loop, `hint` (how to continue)
    by whoever knows the run folder; the CLI prints `message` and exits with 128 + the signal's number."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__()
        self.signum = signum
        self.where = ""
        self.hint = ""

    @property
    def message(self) -> str:
        name = signal.Signals(self.signum).name
        return "interrupted" + (f" at {self.where}" if self.where else "") + f" ({name})" + (
            f"; {self.hint}" if self.hint else "")

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)

    def __str__(self) -> str:
        return self.message


def as_interrupted(error: KeyboardInterrupt) -> Interrupted:
    """`error` as an Interrupted (a plain KeyboardInterrupt came from a SIGINT handler that is not ours)."""
    return error if isinstance(error, Interrupted) else Interrupted(signal.SIGINT)


@contextmanager
def interrupt_signals() -> Iterator[None]:
    """While inside, SIGINT, SIGTERM and SIGHUP raise `Interrupted` in the main thread (elsewhere nothing changes: Python
    only lets the main thread set handlers). The previous handlers come back on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in _SIGNALS
                if signal.getsignal(s) is not signal.SIG_IGN}  # a signal the parent chose to ignore stays ignored
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
