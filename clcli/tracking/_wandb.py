"""Weights & Biases, through wandb: project, entity and name from the recipe or the usual WANDB_* variables;
offline (WANDB_MODE=offline, or no W&B login) it keeps the run in <run>/wandb/ for `wandb sync` (W&B's own lines
say where)."""
from __future__ import annotations

import os

from ._base import Context, Tracker


def _logged_in(wandb) -> bool:
    try:
        return bool(os.environ.get("WANDB_API_KEY") or wandb.api.api_key)
    except Exception:  # noqa: BLE001 - any doubt: not logged in (offline, never a login prompt)
        return False


class WandB(Tracker):
    name = "wandb"

    def __init__(self, ctx: Context, note):
        import wandb

        mode = os.environ.get("WANDB_MODE")
        if mode in (None, "", "online") and not _logged_in(wandb):
            mode = "offline"
            note("W&B: not logged in (no WANDB_API_KEY, no `wandb login`): logging offline")
        run_id = ctx.previous.get("id")
        self.run = wandb.init(
            project=ctx.project or os.environ.get("WANDB_PROJECT") or "clcli",
            entity=ctx.entity or os.environ.get("WANDB_ENTITY"), name=ctx.name, group=ctx.group,
            config=ctx.hparams, dir=os.environ.get("WANDB_DIR") or str(ctx.run_dir), mode=mode,
            id=run_id, resume="allow" if run_id else None,
            settings=wandb.Settings(console="off", quiet=True))  # the live progress stays on the terminal, not in W&B's log
        if not ctx.resumed:
            for key, text in ctx.texts.items():
                self.run.summary[key] = text

    def ids(self) -> dict:
        return {"id": self.run.id, "project": self.run.project}

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def finish(self, table: str) -> None:
        self.run.summary["results"] = table

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)
