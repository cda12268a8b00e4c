"""Fault injection for the tests: stop the process mid-epoch to check that --resume is exact and that interruptions
are reported. Only in the run when CLCLI_FAULT_KILL_AT_STEP is set (the global step before which it stops);
CLCLI_FAULT_SIGNAL=INT, TERM or HUP sends that signal instead of KILL."""
from __future__ import annotations

import os
import signal

from ._callbacks import Callback, Loop

KILL_AT_STEP = "CLCLI_FAULT_KILL_AT_STEP"


def requested() -> "FaultInjection | None":
    at = os.environ.get(KILL_AT_STEP)
    return FaultInjection(int(at), os.environ.get("CLCLI_FAULT_SIGNAL", "KILL")) if at is not None else None


class FaultInjection(Callback):
    def __init__(self, at_step: int, signal_name: str):
        self.at_step, self.signal = at_step, getattr(signal, "SIG" + signal_name)

    def on_step_start(self, loop: Loop) -> None:
        if loop.global_step - 1 == self.at_step:  # steps 0 .. at_step - 1 done: stop as step at_step starts
            os.kill(os.getpid(), self.signal)
