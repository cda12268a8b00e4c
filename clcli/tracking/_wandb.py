"""Weights & Biases, through wandb: project, entity and name from the recipe or the usual WANDB_* variables;
offline (WANDB_MODE=offline, or no W&B login) it keeps the run in <run>/wandb/ for `wandb sync` (W&B's own lines
say where)."""
from __future__ import annotations

import os
from pathlib import Path

from ._base import Context, Tracker, position_of


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
            # console off: the live progress stays on the terminal, out of W&B's log
            settings=wandb.Settings(console="off", quiet=True))
        # clcli's step is a metric of its own, the x-axis of every other: each record is then committed as it is
        # logged (W&B keeps a row with an explicit `step=` open until a later step comes, and a kill loses it), and
        # the epoch record may share its step with the step record before it.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        if run_id:
            self.held = self._held()
        if not ctx.resumed:
            for key, text in ctx.texts.items():
                self.run.summary[key] = text

    def _held(self) -> tuple[int, int]:
        """Where the logged run stops (resuming). W&B writes its offline file every 15 s, so a killed session may
        hold less than it was sent: offline, its earlier sessions' files are read with W&B's own reader; online,
        the server's summary holds the last step (taken as complete: an epoch record is never sent twice)."""
        if not self.run.settings._offline:
            step = self.run.summary.get("step")
            return (int(step), 1) if step is not None else (0, 0)
        import json
        import subprocess
        import sys

        current = Path(self.run.settings.sync_dir)
        steps: dict[int, set[str]] = {}
        for session in current.parent.glob(f"offline-run-*-{self.run.id}"):
            if session == current:
                continue
            out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(session)],
                                 capture_output=True, text=True, check=True).stdout
            for line in out.splitlines():
                record = json.loads(line)
                item = record.get("history", {}).get("item", {}) if record.get("type") == "history" else {}
                if "step" in item:
                    steps.setdefault(int(item["step"]), set()).update(item)
        return position_of(steps)

    def ids(self) -> dict:
        return {"id": self.run.id, "project": self.run.project}

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log({"step": step, **scalars})

    def finish(self, table: str) -> None:
        self.run.summary["results"] = table

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)
