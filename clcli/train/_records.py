"""metrics.jsonl (rank 0) and the trackers (train.log): every step record at a log step and every epoch record."""
from __future__ import annotations

from clcli import run as run_folder
from clcli import tracking

from ._callbacks import Callback, EpochEnd, Loop, Window


class _NoLog:
    """metrics.jsonl on processes other than rank 0: nothing is written."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class Records(Callback):
    def __init__(self, trackers: tracking.Trackers):
        self.trackers = trackers  # TensorBoard, W&B, MLflow (rank 0's; nothing elsewhere)
        self.log = _NoLog()

    def on_fit_start(self, loop: Loop) -> None:
        if loop.dist.main:  # a resumed run keeps the records of the epochs its checkpoint holds, no more
            self.log = run_folder.MetricsLog(loop.run_dir / "metrics.jsonl", keep_before_epoch=loop.start_epoch)

    def on_step_end(self, loop: Loop, window: Window | None) -> None:
        if window is not None:
            self._write({"type": "step", "epoch": loop.epoch, "step": loop.global_step,
                         "lr": loop.optimisation.lr, "images_per_s": round(window.rate, 1),
                         **{k: round(v, 5) for k, v in window.means.items()},
                         **{f"{i}/train_acc": round(a, 3) for i, a in enumerate(window.accuracy)}})

    def on_epoch_end(self, loop: Loop, end: EpochEnd) -> None:
        self._write(end.record)

    def close(self) -> None:
        self.log.close()

    def _write(self, record: dict) -> None:
        self.log.write(record)
        self.trackers.log(record)
