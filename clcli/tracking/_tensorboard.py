"""TensorBoard: event files in <run>/tb/, through torch.utils.tensorboard."""
from __future__ import annotations

from ._base import Context, Tracker


def _hparam(value):
    """What TensorBoard's hparams accept: numbers, text and booleans."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


class TensorBoard(Tracker):
    name = "tensorboard"

    def __init__(self, ctx: Context, note):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = ctx.run_dir / "tb"
        # Resuming, TensorBoard drops every step logged before (a kill may have cut its last seconds) and is sent
        # metrics.jsonl's records again: what it shows is the record, nothing more, nothing less.
        self.writer = SummaryWriter(str(self.log_dir), purge_step=1 if ctx.resumed else None, flush_secs=10)
        if not ctx.resumed:
            from torch.utils.tensorboard.summary import hparams

            # the HPARAMS tab sets the hyperparameters against each network's test accuracy
            metrics = {f"{label}/test_acc": 0.0 for label in ctx.labels}
            for part in hparams({k: _hparam(v) for k, v in ctx.hparams.items()}, metrics):
                self.writer.file_writer.add_summary(part)
            for key, text in ctx.texts.items():
                self.writer.add_text(key, _markdown_code(text), 0)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, table: str) -> None:
        self.writer.add_text("results", table)

    def close(self, status: str) -> None:
        self.writer.close()


def _markdown_code(text: str) -> str:
    """Plain text kept as it is by TensorBoard's markdown (indented: a code block)."""
    return "\n".join("    " + line for line in text.splitlines())
