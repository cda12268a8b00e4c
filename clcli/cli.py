"""The `clcli` command line: parse, call the library, format with rich. No logic lives only here."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from clcli.errors import ClcliError

app = typer.Typer(
    name="clcli",
    help="Collaborative learning of timm classifiers with Mutual Knowledge Bases (MKBs).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Collaborative learning of timm classifiers with Mutual Knowledge Bases (MKBs)."""


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


@app.command()
def probe(
    models: List[str] = typer.Argument(..., help="two or more timm model names"),
    input_size: int = typer.Option(32, "--input-size", help="square input size in pixels"),
    stem: str = typer.Option("imagenet", help="imagenet (as built) or small (stride-1 stem, no stem pooling)"),
    mkbs: int = typer.Option(1, "--mkbs", help="number of MKB sites to plan, on different stages"),
    num_classes: int = typer.Option(10, "--num-classes"),
    as_json: bool = typer.Option(False, "--json", help="print the versioned plan as JSON"),
) -> None:
    """Trace the models, find where their feature maps meet, and plan the MKBs."""
    from clcli import probe as probe_lib

    result = probe_lib.plan(models, input_size, stem=stem, mkbs=mkbs, num_classes=num_classes)
    if as_json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
        return
    from clcli._report import print_plan

    print_plan(_console(), result)


def _free_run_dir(name: str) -> Path:
    """runs/<name>, or runs/<name>-2, -3, ... when taken: a default never replaces an earlier run."""
    base = Path("runs") / name
    candidate, k = base, 1
    while candidate.exists():
        k += 1
        candidate = base.with_name(f"{base.name}-{k}")
    return candidate


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def train(
    ctx: typer.Context,
    recipe: str = typer.Option("quickstart", "--recipe", "-r", help="built-in recipe name or a YAML file"),
    data: Optional[str] = typer.Option(None, "--data", help="local dataset folder (or hub id) replacing the recipe's"),
    models: Optional[str] = typer.Option(None, "--models", help="timm model names (space separated)"),
    method: Optional[str] = typer.Option(None, "--method", help="cl, il, ... (comma separated for several)"),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run folder (default runs/<recipe>)"),
    plan: Optional[Path] = typer.Option(None, "--plan", help="MKB plan from `clcli probe --json`"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue the run in this folder"),
    force: bool = typer.Option(False, "--force", help="replace an existing run folder"),
    overrides: List[str] = typer.Option([], "--set", help="recipe override key=value (dotted keys)"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no live progress bar"),
) -> None:
    """Train networks together with MKBs (or with a baseline method) and write a run folder."""
    from clcli import recipes
    from clcli import train as train_lib

    console = _console()
    if resume is not None:
        results = train_lib.resume(resume, show_progress=not no_progress, console=console)
        _print_results(console, results)
        return
    sets = list(overrides)
    if models is not None:
        names = [models, *ctx.args]
        sets += [f"models=[{', '.join(names)}]"]
    elif ctx.args:
        raise ClcliError(f"unexpected arguments: {' '.join(ctx.args)}")
    if method is not None:
        sets.append(f"methods=[{method}]")
    if epochs is not None:
        sets.append(f"train.epochs={epochs}")
    if seed is not None:
        sets.append(f"train.seed={seed}")
    if data is not None:
        sets.append(f"data.source={json.dumps(data)}")
    rec = recipes.load(recipe, sets)
    run_dir = out if out is not None else _free_run_dir(rec.name)
    results = train_lib.train(rec, run_dir, plan_path=str(plan) if plan else None, force=force,
                              show_progress=not no_progress, console=console)
    _print_results(console, results)
    console.print(f"run folder: [bold]{run_dir}[/]")


def _print_results(console, results: dict) -> None:
    from rich.table import Table

    names = list(next(iter(results.values()))["test_acc"]) if results else []
    table = Table(title="test accuracy (%) of each network as deployed", title_justify="left")
    table.add_column("method")
    for n in names:
        table.add_column(n, justify="right")
    for m, summary in results.items():
        table.add_row(m, *[f"{summary['test_acc'][n]:.2f}" for n in names])
    console.print(table)


def main() -> None:
    try:
        app()
    except ClcliError as e:
        _console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
