"""The checkpoint after every epoch: the method, the optimiser and schedule, and every part's state, written whole
or not at all, and never with NaN or inf in a weight or buffer."""
from __future__ import annotations

from clcli import models
from clcli import run as run_folder
from clcli.errors import ClcliError

from . import _dist
from ._callbacks import Callback, EpochEnd, Loop


class Checkpoint(Callback):
    def on_epoch_end(self, loop: Loop, end: EpochEnd) -> None:
        state = loop.optimisation.state(loop.method, end.epoch + 1)
        state.update({part.key: part.state_dict() for part in loop.callbacks if part.key is not None})
        self._check_finite(loop, state["method"], end.epoch)
        if loop.dist.main:
            try:
                run_folder.save_checkpoint(loop.run_dir / run_folder.CHECKPOINT, state)
            except ClcliError as e:  # a full disk: say what is kept
                raise ClcliError(f"{e}; stopped after epoch {end.epoch + 1}: "
                                 f"{run_folder.kept_checkpoint(loop.run_dir, loop.saved_epoch)}") from None
        loop.saved_epoch = end.epoch + 1

    @staticmethod
    def _check_finite(loop: Loop, state: dict, epoch: int) -> None:
        """Stop before a checkpoint with NaN or inf in a weight or buffer is written (a BatchNorm running_var that
        overflowed while the loss stayed finite): the previous checkpoint stays. Rank 0 decides for every process."""
        count, names = _dist.from_main(loop.dist, models.non_finite(state) if loop.dist.main else None)
        if count:
            raise ClcliError(f"after epoch {epoch + 1}, the weights and buffers have "
                             f"{models.describe_non_finite(count, names)}; stopped without saving them: "
                             f"{run_folder.kept_checkpoint(loop.run_dir, loop.saved_epoch)}; try a lower train.lr")
