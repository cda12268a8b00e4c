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


def _data_override(data: str) -> str:
    """`--data` as a recipe override; a local folder becomes absolute so the run folder works from anywhere."""
    if Path(data).expanduser().exists():
        data = str(Path(data).expanduser().resolve())
    return f"data.source={json.dumps(data)}"


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
        sets.append(_data_override(data))
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


recipes_app = typer.Typer(help="List and show the built-in recipes.", invoke_without_command=True,
                          no_args_is_help=False)
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback()
def recipes_list(ctx: typer.Context) -> None:
    """A table of the built-in recipes."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from clcli import recipes

    table = Table(title="built-in recipes", title_justify="left")
    for col in ("name", "dataset", "models", "methods", "epochs", "input", "stem"):
        table.add_column(col)
    for name in recipes.builtin_names():
        r = recipes.load(name)
        table.add_row(name, r.data.source, ", ".join(r.models), ", ".join(r.methods), str(r.train.epochs),
                      str(r.input_size), r.stem)
    _console().print(table)


@recipes_app.command("show")
def recipes_show(name: str = typer.Argument(..., help="recipe name or YAML file"),
                 overrides: List[str] = typer.Option([], "--set")) -> None:
    """Print a recipe resolved (defaults filled in, overrides applied) as YAML."""
    import yaml

    from clcli import recipes

    sys.stdout.write(yaml.safe_dump(recipes.load(name, overrides).to_dict(), sort_keys=False))


@app.command()
def export(
    run: Optional[Path] = typer.Argument(None, help="run folder (default: the newest under runs/)"),
    split: bool = typer.Option(True, "--split/--no-split", help="one file per network with its MKB half"),
    out: Path = typer.Option(Path("exported"), "--out", "-o", help="output folder"),
    plain: bool = typer.Option(False, "--plain", help="also write timm-only files (without the MKB halves)"),
    hub_folder: bool = typer.Option(False, "--hub-folder", help="also write a Hugging Face Hub-style folder"),
    measure: bool = typer.Option(True, "--measure/--no-measure", help="measure test accuracy at export"),
    force: bool = typer.Option(False, "--force", help="replace existing exported files"),
) -> None:
    """Export each network of a run on its own, with its MKB half, as safetensors."""
    from rich.table import Table

    from clcli.export import export_run
    from clcli.train._run import latest_run

    if not split:
        raise ClcliError("only --split export exists: each network is written on its own")
    run_dir = run if run is not None else latest_run()
    if run_dir is not None and not (run_dir / "run.json").is_file():
        subruns = sorted(p.parent for p in run_dir.glob("*/run.json"))
        cl_runs = [p for p in subruns if p.name == "cl"]
        if not subruns:
            raise ClcliError(f"{run_dir} is not a clcli run folder (no run.json)")
        run_dir = (cl_runs or subruns)[0]
    console = _console()
    index = export_run(run_dir, out, plain=plain, hub_folder=hub_folder, measure=measure, force=force)
    table = Table(title=f"exported from {run_dir} ({index['method']}) to {out}", title_justify="left")
    for col in ("network", "file", "test acc (%)"):
        table.add_column(col)
    if plain:
        table.add_column("timm-only acc (%)")
    for e in index["networks"]:
        acc = f"{e['test_acc']:.2f}" if e["test_acc"] is not None else "-"
        row = [e["model"], e["file"], acc]
        if plain:
            row.append(f"{e['plain_test_acc']:.2f}" if e.get("plain_test_acc") is not None else "-")
        table.add_row(*row)
    console.print(table)
    if plain:
        console.print("[yellow]warning:[/] the timm-only files drop the MKB halves the networks were trained with; "
                      "their accuracy is the last column")


@app.command("eval")
def evaluate_cmd(
    file: Path = typer.Argument(..., help="a file written by `clcli export --split`"),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="recipe for the test data (default: the "
                                         "recipe stored in the file)"),
    data: Optional[str] = typer.Option(None, "--data", help="local dataset folder replacing the recipe's"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Measure the test accuracy of an exported network, on its own."""
    import torch

    from clcli import recipes
    from clcli.export import load
    from clcli.train import evaluate, load_data

    net = load(file)
    manifest = net.clcli_manifest
    rec = recipes.load(recipe) if recipe else recipes.from_dict(manifest["recipe"], str(file))
    if data is not None:
        rec.data.source = data
    test = load_data(rec, torch.device("cpu"))
    if len(test.class_names) != len(manifest["class_names"]):
        raise ClcliError(f"the data has {len(test.class_names)} classes; {file} was trained on "
                         f"{len(manifest['class_names'])}")
    acc = evaluate(net, test.test_images, test.test_labels, manifest["mean"], manifest["std"], topk=(1, 5)
                   if len(test.class_names) > 5 else (1,))
    if as_json:
        sys.stdout.write(json.dumps({"file": str(file), "model": manifest["model"], **acc}) + "\n")
        return
    _console().print(f"{manifest['model']}: top-1 {acc['top1']:.2f}%"
                     + (f", top-5 {acc['top5']:.2f}%" if "top5" in acc else "")
                     + f" on {len(test.test_labels)} test images (export recorded "
                     + (f"{manifest['test_acc']:.2f}%)" if manifest.get("test_acc") is not None else "nothing)"))


@app.command()
def bench(
    models: List[str] = typer.Argument(None, help="two or more timm model names (default resnet10t "
                                        "mobilenetv3_small_050)"),
    input_size: int = typer.Option(32, "--input-size"),
    stem: str = typer.Option("small", "--stem"),
    batch_size: int = typer.Option(128, "--batch-size"),
    device: str = typer.Option("auto", "--device"),
    seconds: float = typer.Option(10.0, "--seconds", help="minimum measuring time"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Step time of each network alone and of the CL cohort on the same batch, and their ratio."""
    from clcli.bench import run

    result = run(models or ["resnet10t", "mobilenetv3_small_050"], input_size=input_size, stem=stem,
                 batch_size=batch_size, device=device, min_seconds=seconds)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    from rich.table import Table

    table = Table(title=f"training step, batch {batch_size}, {input_size}px, {result['device']}, "
                        f"{result['threads']} threads (median of {result['rounds']} rounds)", title_justify="left")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    table.add_column("images/s", justify="right")
    for k, v in result["step_seconds"].items():
        table.add_row(k, f"{v:.4f}", f"{batch_size / v:.0f}")
    console = _console()
    console.print(table)
    ok = result["ratio_cl_over_il_sum"] <= result["goal_ratio"]
    console.print(f"CL / (IL sum) = [bold]{result['ratio_cl_over_il_sum']:.3f}[/] (goal <= {result['goal_ratio']}"
                  f": {'met' if ok else 'not met'})")
    for site in result["mkb"]:
        console.print(f"MKB at {site['site']}: embedding {site['embedding']}, params +"
                      + " / ".join(f"{100 * f:.1f}%" for f in site["param_overhead"]) + ", MACs +"
                      + " / ".join(f"{100 * f:.1f}%" for f in site["mac_overhead"]))
    if "w2_seconds_per_step_uncached" in result:
        console.print(f"W2 (different inputs), uncached: {result['w2_seconds_per_step_uncached']:.3f} s per step")


@app.command()
def compare(
    recipe: str = typer.Option("quickstart", "--recipe", "-r", help="built-in recipe name or a YAML file"),
    methods: str = typer.Option("il,el,kd,fitnets,dml,wel,mkb-solo,cl", "--methods",
                                help="comma separated; IL always runs (reference, teacher, EL)"),
    seeds: int = typer.Option(3, "--seeds", help="seeds per method: the recipe's seed, +1, +2, ..."),
    out: Path = typer.Option(..., "--out", "-o", help="report folder (runs/ inside it are reused)"),
    data: Optional[str] = typer.Option(None, "--data", help="local dataset folder (or hub id) replacing the recipe's"),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    overrides: List[str] = typer.Option([], "--set", help="recipe override key=value (dotted keys)"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no live progress bar"),
) -> None:
    """Train every method on the same recipe and seeds; write table.md (paper Table 2), results.csv, curves.png."""
    from rich.table import Table

    from clcli import recipes
    from clcli.compare import compare as compare_lib, parse_methods

    sets = list(overrides)
    if epochs is not None:
        sets.append(f"train.epochs={epochs}")
    if data is not None:
        sets.append(_data_override(data))
    names = parse_methods(methods)
    console = _console()
    result = compare_lib(recipes.load(recipe, sets), names, seeds, out, show_progress=not no_progress,
                         console=console)
    seeds_text = ", ".join(map(str, result["seeds"]))
    table = Table(title=f"test accuracy (%), mean ± std over seeds {seeds_text}", title_justify="left")
    table.add_column("method")
    table.add_column(" / ".join(result["networks"]))
    for label, cell in result["rows"]:
        table.add_row(label, cell)
    console.print(table)
    for what, path in result["paths"].items():
        console.print(f"{what}: [bold]{path}[/]")


def main() -> None:
    try:
        app()
    except ClcliError as e:
        _console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
