"""A run's experiment trackers (train.log): started with the run's name, labels, hyper-parameters and plan, and on
resume continuing the runs they logged, sent first what metrics.jsonl keeps that they lack."""
from __future__ import annotations

from pathlib import Path

from clcli import run as run_folder
from clcli import tracking


def start_tracking(method_name: str, recipe, plan, run_dir: Path, info: dict, state, console) -> tracking.Trackers:
    """The run's trackers (train.log), each continuing its logged run when resuming (ids kept in run.json) and
    sent first the records metrics.jsonl keeps that it lacks: each is sent only records it does not hold."""
    if not recipe.train.log:
        return tracking.NONE
    import yaml

    from clcli import recipes
    from clcli._report import plan_text
    from clcli.models import network_labels

    records = run_folder.read_metrics(run_dir)  # before the loop truncates it to the checkpoint's epochs
    start_epoch = int(state["epoch"]) if state is not None else 0
    cfg = recipe.train
    name = f"{recipe.name}-{method_name}-seed{cfg.seed}" + (
        f"-fold{recipe.data.fold}" if recipe.data.fold is not None else "")
    hparams = {"method": method_name, **recipes.flat(recipe)}
    context = tracking.Context(
        run_dir=run_dir, name=name, labels=network_labels(list(plan.names)), hparams=hparams,
        texts={"plan": plan_text(plan), "recipe": yaml.safe_dump(recipe.to_dict(), sort_keys=False)},
        project=cfg.log_project, entity=cfg.log_entity, group=cfg.log_group, previous=info.get("tracking", {}),
        resumed=bool(records) or state is not None)

    def note(text: str) -> None:
        from rich.markup import escape

        console.print(f"[yellow]note:[/] {escape(text)}", highlight=False, soft_wrap=True)

    trackers = tracking.start(cfg.log, context, note=note if console is not None else None)
    for record in records:  # resuming: what metrics.jsonl keeps and a tracker lacks (a kill cut its last seconds)
        if int(record.get("epoch", 1 << 30)) < start_epoch:
            trackers.log(record)
    return trackers
