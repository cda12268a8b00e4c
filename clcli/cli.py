"""The `clcli` command line: parse, call the library, format with rich. No logic lives only here."""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
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


def _print_version(value: bool) -> None:
    if value:
        from clcli import __version__

        typer.echo(f"clcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="print clcli's version and exit"),
) -> None:
    """Collaborative learning of timm classifiers with Mutual Knowledge Bases (MKBs)."""


def _console(stderr: bool = False):
    import os

    from rich.console import Console

    # Under torchrun only rank 0 reports; every rank still prints its errors (stderr).
    return Console(stderr=stderr, quiet=not stderr and os.environ.get("RANK", "0") != "0")


@contextmanager
def _reported_interrupt():
    """Ctrl-C / SIGTERM / SIGHUP during training: the one line saying where it stopped and how to continue
    (training's `Interrupted`), and exit code 128 + the signal (typer would swallow the message)."""
    try:
        yield
    except KeyboardInterrupt as e:
        _console(stderr=True).print(f"[bold yellow]{getattr(e, 'message', 'interrupted')}[/]", highlight=False,
                                    soft_wrap=True)
        raise typer.Exit(getattr(e, "exit_code", 130)) from None


def _interruptible(hint: str):
    """A command that Ctrl-C, SIGTERM or SIGHUP stops with one line ("interrupted (SIGINT); `hint`") and exit code
    128 + the signal, not typer's "Aborted!" or a silent exit."""
    import functools

    def wrap(command):
        @functools.wraps(command)  # typer reads the options from the wrapped signature
        def run(*args, **kwargs):
            from clcli.train import Interrupted, interrupt_signals

            with _reported_interrupt(), interrupt_signals():
                try:
                    return command(*args, **kwargs)
                except Interrupted as e:
                    e.hint = e.hint or hint
                    raise

        return run

    return wrap


@app.command()
def probe(
    models: List[str] = typer.Argument(..., help="two or more timm model names"),
    input_size: int = typer.Option(32, "--input-size", help="square input size in pixels"),
    stem: str = typer.Option("imagenet", help="imagenet (as built) or small (stride-1 stem, no stem pooling)"),
    mkbs: int = typer.Option(1, "--mkbs", help="number of MKB sites to plan, on different stages"),
    site: Optional[List[str]] = typer.Option(None, "--site", help="plan this site instead of the best: its number in "
                                             "the table, a map size (4x4) or all (one MKB at every size the models "
                                             "meet at); repeat for several MKBs"),
    num_classes: int = typer.Option(10, "--num-classes"),
    as_json: bool = typer.Option(False, "--json", help="print the versioned plan as JSON"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="also draw the plan as a PNG: tap points of each "
                                        "network, MKB sites joined across them"),
) -> None:
    """Trace the models, find where their feature maps meet, and plan the MKBs."""
    from clcli import probe as probe_lib

    if plot is not None:
        from clcli import files

        files.check_output_file(plot, "plot", force=True)  # before tracing: a bad path fails at once
    result = probe_lib.plan(models, input_size, stem=stem, mkbs=mkbs, num_classes=num_classes, sites=site)
    if plot is not None:
        from clcli.plots import probe_png

        path, (width, height) = probe_png(result, plot)
        _console(stderr=as_json).print(f"plot: [bold]{path}[/] ({width}x{height} px)", highlight=False)
    if as_json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
        return
    from clcli._report import print_plan

    print_plan(_console(), result)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def train(
    ctx: typer.Context,
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="built-in recipe name or a YAML file "
                                         "(default: quickstart; finetune with --pretrained or --weights)"),
    data: Optional[str] = typer.Option(None, "--data", help="dataset: image folder (class_name/*.jpg), folder of "
                                       "parquet/arrow files, or hub id; replaces the recipe's"),
    val: Optional[str] = typer.Option(None, "--val", help="a separate image folder to evaluate on (default: the "
                                      "data's test or validation split, else a held-out part of train)"),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="part of each class held out for "
                                                 "validation when the data has no evaluation split (default 0.1)"),
    models: Optional[str] = typer.Option(None, "--models", help="timm model names (space separated)"),
    pretrained: bool = typer.Option(False, "--pretrained", help="start from timm's pretrained weights (the Hub); "
                                    "input size and mean/std from their config"),
    weights: List[str] = typer.Option([], "--weights", help="MODEL=FILE: start MODEL from a local safetensors file "
                                      "or timm checkpoint (repeatable)"),
    method: Optional[str] = typer.Option(None, "--method", help="cl, il, ... (comma separated for several)"),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    placement: Optional[str] = typer.Option(None, "--placement", help="under torchrun: replicated (DDP, the "
                                            "default) or per-network (one network per process)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run folder (default runs/<recipe>)"),
    plan: Optional[Path] = typer.Option(None, "--plan", help="MKB plan from `clcli probe --json`"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue the run in this folder"),
    force: bool = typer.Option(False, "--force", help="replace an existing run folder"),
    overrides: List[str] = typer.Option([], "--set", help="recipe override key=value (dotted keys)"),
    log: Optional[str] = typer.Option(None, "--log", help="follow the run in experiment trackers: tensorboard, "
                                      "wandb, mlflow (comma separated for several; train.log)"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no live progress bar"),
) -> None:
    """Train networks together with MKBs (or with a baseline method) and write a run folder."""
    from clcli import recipes
    from clcli import train as train_lib
    from clcli.run import free_folder

    console = _console()
    if resume is not None:
        if log is not None:
            raise ClcliError("--log cannot change a resumed run: it logs to the trackers it was started with")
        with _reported_interrupt():
            results = train_lib.resume(resume, show_progress=not no_progress, console=console)
        _print_results(console, results)
        return
    if models is None and ctx.args:
        raise ClcliError(f"unexpected arguments: {' '.join(ctx.args)}")
    rec = recipes.resolve(recipe, data=data, val=val, val_fraction=val_fraction,
                          models=[models, *ctx.args] if models is not None else None, pretrained=pretrained,
                          weights=weights, methods=method, epochs=epochs, seed=seed, placement=placement,
                          log=_trackers(log), overrides=overrides)
    run_dir = out if out is not None else free_folder(rec.name)
    with _reported_interrupt():
        results = train_lib.train(rec, run_dir, plan_path=str(plan) if plan else None, force=force,
                                  show_progress=not no_progress, console=console)
    _print_results(console, results)
    skipped = max((summary.get("skipped_images", 0) for summary in results.values()), default=0)
    if skipped:
        console.print(f"skipped {skipped} unreadable image{'s' if skipped > 1 else ''} (listed in run.json)")
    console.print(f"run folder: [bold]{run_dir}[/]")
    if (Path(run_dir) / "folds.json").is_file():
        console.print(f"fold summary: [bold]{Path(run_dir) / 'folds.json'}[/] (one run folder per fold: fold0/, ...)")


def _trackers(log: str | None) -> list[str] | None:
    """--log tensorboard,wandb as a list (None: the recipe's train.log)."""
    return None if log is None else [name.strip() for name in log.split(",") if name.strip()]


def _print_results(console, results: dict) -> None:
    from rich.table import Table

    names = list(next(iter(results.values()))["test_acc"]) if results else []
    folds = next(iter(results.values())).get("folds") if results else None  # the fold protocol (STL-10)
    title = "test accuracy (%) of each network as deployed" + (
        f", mean ± std over {len(folds)} folds" if folds is not None else "")
    table = Table(title=title, title_justify="left")
    table.add_column("method")
    for n in names:
        table.add_column(n, justify="right")

    def cell(summary: dict, key: str, n: str) -> str:
        std = summary.get(f"{key}_std")
        return f"{summary[key][n]:.2f}" + (f" ± {std[n]:.2f}" if std else "")

    for m, summary in results.items():
        table.add_row(m, *[cell(summary, "test_acc", n) for n in names])
        if "test_top5" in summary:
            table.add_row(f"{m} (top-5)", *[cell(summary, "test_top5", n) for n in names])
        if "ema_test_acc" in summary:  # train.ema_decay: the moving average of the weights
            table.add_row(f"{m} (EMA)", *[f"{summary['ema_test_acc'][n]:.2f}" for n in names])
        if "best" in summary:  # train.keep_best: each network's best epoch on the held-out validation images
            best = summary["best"]
            table.add_row(f"{m} (best epoch)", *[f"{best[n]['test_acc']:.2f} (ep {best[n]['epoch']})" for n in names])
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
    names = recipes.builtin_names()
    table.add_column("name", no_wrap=True, min_width=max(map(len, names), default=4))  # never cut a name short
    for col in ("dataset", "models", "methods", "epochs", "input", "stem"):
        table.add_column(col)
    for name in names:
        r = recipes.load(name)
        table.add_row(name, r.data.source or "--data", ", ".join(r.models), ", ".join(r.methods),
                      str(r.train.epochs), str(r.input_size or "timm"), r.stem)
    _console().print(table)


@recipes_app.command("show")
def recipes_show(name: str = typer.Argument(..., help="recipe name or YAML file"),
                 overrides: List[str] = typer.Option([], "--set")) -> None:
    """Print a recipe resolved (defaults filled in, overrides applied) as YAML."""
    import yaml

    from clcli import recipes

    resolved = recipes.load(name, overrides).to_dict()
    shown = resolved.pop("name")  # a copy (`> my.yaml`) is named after its own file, so its runs land in runs/my
    sys.stdout.write(f"# recipe '{shown}' resolved by clcli recipes show; a copy is named after its file\n"
                     + yaml.safe_dump(resolved, sort_keys=False))


@app.command()
@_interruptible("each file is either written whole or not at all: run the same command again with --force (the "
                "files already written are complete)")
def export(
    run: Optional[Path] = typer.Argument(None, help="run folder (default: the newest under runs/)"),
    split: bool = typer.Option(True, "--split/--no-split", help="one file per network with its MKB half"),
    out: Path = typer.Option(Path("exported"), "--out", "-o", help="output folder"),
    plain: bool = typer.Option(False, "--plain", help="also write timm-only files (without the MKB halves)"),
    hub_folder: bool = typer.Option(False, "--hub-folder", help="also write a Hugging Face Hub-style folder"),
    onnx: bool = typer.Option(False, "--onnx", help="also write one .onnx file per network, its MKB half inside the "
                              "graph, checked against ONNX Runtime (needs clcli[onnx])"),
    measure: bool = typer.Option(True, "--measure/--no-measure", help="measure test accuracy at export"),
    force: bool = typer.Option(False, "--force", help="replace existing exported files"),
    ema: bool = typer.Option(False, "--ema", help="the moving average of each network's weights (train.ema_decay)"),
    best: bool = typer.Option(False, "--best", help="each network's best epoch on the validation split "
                                                    "(train.keep_best)"),
    log: bool = typer.Option(False, "--log", help="also log the exported files and manifest.json as artifacts of "
                                                  "the run's MLflow run (trained with --log mlflow)"),
) -> None:
    """Export each network of a run on its own, with its MKB half, as safetensors (and, with --onnx, as ONNX).

    Its last weights by default; with --ema the moving average of its weights, with --best its best epoch's."""
    from clcli.export import export_run
    from clcli.run import Run

    if not split:
        raise ClcliError("only --split export exists: each network is written on its own")
    if ema and best:
        raise ClcliError("--ema and --best choose different weights: give one of them")
    console = _console()
    if run is None:
        run = Run.latest().path
        console.print(f"exporting {run}, the newest run with a checkpoint under runs/", highlight=False,
                      soft_wrap=True)
    index = export_run(Run.pick(run).path, out, plain=plain, hub_folder=hub_folder, onnx=onnx, measure=measure,
                       force=force, weights="ema" if ema else "best" if best else "last", log=log)
    _print_export(console, index, out, plain=plain, onnx=onnx)


def _print_export(console, index: dict, out: Path, *, plain: bool, onnx: bool) -> None:
    """What `clcli export` did: a table of the files and their accuracy, and what to know about them."""
    from rich.table import Table

    if index["status"] != "finished":
        console.print(f"[yellow]warning:[/] {index['run']} is not finished ({index['status']}, "
                      f"{index['epochs_trained']} of {index['epochs_planned']} epochs): exported its last checkpoint",
                      highlight=False, soft_wrap=True)
    chosen = {"ema": ", moving-average weights", "best": ", best-epoch weights"}.get(
        index["networks"][0].get("weights", "last"), "") if index["networks"] else ""
    table = Table(title=f"exported from {index['run']} ({index['method']}{chosen}) to {out}", title_justify="left")
    for col in ("network", "file", "test acc (%)"):
        table.add_column(col)
    if plain:
        table.add_column("timm-only acc (%)")
    if onnx:
        for col in ("ONNX file", "ORT vs PyTorch max abs / rel error", "s"):
            table.add_column(col)
    for e in index["networks"]:
        acc = f"{e['test_acc']:.2f}" if e["test_acc"] is not None else "-"
        row = [e["network"], e["file"], acc]
        if plain:
            row.append(f"{e['plain_test_acc']:.2f}" if e.get("plain_test_acc") is not None else "-")
        if onnx:
            onnx_files = e["onnx_file"] + (f" + {e['onnx_data_file']}" if e.get("onnx_data_file") else "")
            row += [onnx_files, f"{e['onnx_max_abs_error']:.1e} / {e['onnx_max_rel_error']:.1e}",
                    f"{e['onnx_seconds']:.1f}"]
        table.add_row(*row)
    console.print(table)
    if onnx:
        from clcli.export import onnx_tolerance

        console.print(f"each ONNX file passed onnx.checker and matched PyTorch in ONNX Runtime on a fixed batch "
                      f"(tolerance {onnx_tolerance()})", highlight=False)
    if index["logged"]:
        console.print(f"logged {len(index['logged'])} files to the run's MLflow run (artifacts under exported/)",
                      highlight=False)
    if plain:
        changes = [f"{e['network']} {e['plain_test_acc'] - e['test_acc']:+.2f}" for e in index["networks"]
                   if e.get("plain_test_acc") is not None and e["test_acc"] is not None]
        console.print("[yellow]warning:[/] the timm-only files drop the MKB halves the networks were trained with"
                      + (f"; measured top-1 change without them: {', '.join(changes)} points" if changes else
                         " (accuracy not measured: --no-measure)"))


@app.command("eval")
@_interruptible("nothing was written: run the same command again")
def evaluate_cmd(
    file: Path = typer.Argument(..., help="a file written by `clcli export`: NAME.safetensors, or NAME.onnx (run by "
                                "ONNX Runtime)"),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="recipe for the test data (default: the "
                                         "recipe stored in the file)"),
    data: Optional[str] = typer.Option(None, "--data", help="local dataset folder replacing the recipe's"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Measure an exported network's test accuracy on its own: overall, per class, and the confusion matrix."""
    from clcli.export import evaluate_export

    result = evaluate_export(file, recipe=recipe, data=data)
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    recorded = result["recorded"]
    console = _console()
    console.print(f"{result['model']}: top-1 {result['top1']:.2f}%"
                  + (f", top-5 {result['top5']:.2f}%" if "top5" in result else "")
                  + f" on {result['images']} images, {result['evaluation']} (export recorded "
                  + (f"{recorded:.2f}%)" if recorded is not None else "nothing)"), highlight=False)
    _print_per_class(console, result["class_names"], result["per_class"], result["confusion"])


# A confusion matrix wider than this many classes does not fit a terminal, nor a table longer than _SHOWN_CLASSES
# rows a screen (then the classes with the lowest accuracy are shown): --json has them whole.
_SHOWN_CONFUSION = 20
_SHOWN_CLASSES = 50


def _print_per_class(console, classes: list[str], accuracy: list, confusion: list[list[int]]) -> None:
    from rich.markup import escape
    from rich.table import Table

    classes = [escape(name) for name in classes]  # a class named "[x]" is shown as it is
    shown = list(range(len(classes)))
    title = "per class: accuracy (%), images, and the class most often answered instead"
    if len(classes) > _SHOWN_CLASSES:
        shown = sorted(shown, key=lambda k: 101.0 if accuracy[k] is None else accuracy[k])[:_SHOWN_CLASSES // 2]
        title = f"the {len(shown)} of {len(classes)} classes with the lowest accuracy (--json has all): " + title[11:]
    table = Table(title=title, title_justify="left")
    for col in ("class", "acc (%)", "images", "most confused with"):
        table.add_column(col, justify="left" if col in ("class", "most confused with") else "right")
    for k in shown:
        name, acc, row = classes[k], accuracy[k], confusion[k]
        wrong = max((j for j in range(len(row)) if j != k), key=lambda j: row[j], default=None)
        table.add_row(name, "-" if acc is None else f"{acc:.2f}", str(sum(row)),
                      f"{classes[wrong]} ({row[wrong]})" if wrong is not None and row[wrong] else "-")
    console.print(table)
    if len(classes) > _SHOWN_CONFUSION:
        console.print(f"confusion matrix: {len(classes)}x{len(classes)}, in --json", highlight=False)
        return
    matrix = Table(title="confusion matrix: rows the true class, columns the answer", title_justify="left")
    matrix.add_column("")
    for k in range(len(classes)):
        matrix.add_column(str(k), justify="right")
    for k, (name, row) in enumerate(zip(classes, confusion)):
        matrix.add_row(f"{k} {name}", *[f"[bold]{v}[/]" if j == k else str(v) for j, v in enumerate(row)])
    console.print(matrix)


@app.command()
@_interruptible("nothing was written: run the same command again")
def predict(
    file: Path = typer.Argument(..., help="a file written by `clcli export` (.safetensors, or .onnx run by ONNX "
                                "Runtime), or timm weights with --model"),
    inputs: List[Path] = typer.Argument(..., help="image files and folders of images"),
    top: int = typer.Option(1, "--top", help="classes shown per image, most probable first"),
    model: Optional[str] = typer.Option(None, "--model", help="timm model name, for a plain timm weights file"),
    batch_size: int = typer.Option(64, "--batch-size"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, mps or auto"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per image (errors included)"),
) -> None:
    """Classify images with an exported network; unreadable files are reported and skipped (exit code 1)."""
    from clcli.predict import image_files, load_classifier, predict as predict_lib
    from clcli.train import resolve_device

    classifier = load_classifier(file, model=model, device=str(resolve_device(device)))
    results = []
    for r in predict_lib(classifier, image_files(inputs), top=top, batch_size=batch_size):
        results.append(r)
        if as_json:  # streamed: a long folder shows progress and can be piped
            sys.stdout.write(json.dumps(r) + "\n")
            sys.stdout.flush()
    failed = [r for r in results if "error" in r]
    if not as_json:
        from rich.table import Table

        shown = min(top, len(classifier.class_names))
        table = Table(title=f"{file}: top {shown} of {len(classifier.class_names)} classes", title_justify="left",
                      caption=f"preprocessing: {classifier.description}", caption_justify="left")
        table.add_column("file", overflow="fold")  # a narrow terminal wraps a path, never cuts it
        for k in range(shown):
            table.add_column(f"#{k + 1}" if top > 1 else "class")
        for r in results:
            if "top" in r:
                table.add_row(r["file"], *[f"{t['class']} {100 * t['prob']:.1f}%" for t in r["top"]])
        _console().print(table)
        errors = _console(stderr=True)
        for r in failed:
            errors.print(f"[bold red]skipped:[/] {r['file']}: {r['error']}", highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(code=1)


@app.command()
def bench(
    models: List[str] = typer.Argument(None, help="two or more timm model names (default resnet10t "
                                        "mobilenetv3_small_050)"),
    input_size: int = typer.Option(32, "--input-size"),
    stem: str = typer.Option("small", "--stem"),
    batch_size: int = typer.Option(128, "--batch-size"),
    device: str = typer.Option("auto", "--device"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (1 on a shared machine)"),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="bf16 (else fp16) autocast on CUDA, as in training"),
    channels_last: bool = typer.Option(False, "--channels-last"),
    compile: bool = typer.Option(False, "--compile", help="torch.compile each network, as train.compile does"),
    seconds: float = typer.Option(10.0, "--seconds", help="minimum measuring time"),
    rounds: int = typer.Option(5, "--rounds", help="minimum timed rounds (one step of each kind per round)"),
    steps_only: bool = typer.Option(False, "--steps-only", help="only the IL and CL steps: no data pipeline, W2 or "
                                    "WEL measurement (what a compiled run adds nothing to)"),
    overrides: List[str] = typer.Option([], "--set", help="train.* override key=value of the step timed: its "
                                        "optimiser as training builds it (train.opt=adamw, train.lr, train.clip_grad)"),
    as_json: bool = typer.Option(False, "--json", help="print the results as one JSON object"),
) -> None:
    """Time the training step of each network alone and of the CL cohort on the same batch, and their ratio.

    Also the MKB overhead, the data pipeline's images/s and the W2 cost of different-input training."""
    from clcli.bench import run

    result = run(models or ["resnet10t", "mobilenetv3_small_050"], input_size=input_size, stem=stem,
                 batch_size=batch_size, device=device, threads=threads, amp=amp, channels_last=channels_last,
                 compile=compile, min_rounds=rounds, min_seconds=seconds, w2=not steps_only,
                 pipeline=not steps_only, overrides=overrides)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    from rich.table import Table

    cpu = result["step_cpu_seconds"]
    table = Table(title=f"training step, batch {batch_size}, {input_size}px, {result['device_name']}, "
                        f"{result['threads']} threads{''.join(f', {o}' for o in result['overrides'])} "
                        f"(median of {result['rounds']} rounds)", title_justify="left")
    for column in ["step", "wall s", "images/s"] + (["CPU s"] if cpu else []) + ["aten ops"]:
        table.add_column(column, justify="left" if column == "step" else "right")
    for k, v in result["step_seconds"].items():
        table.add_row(k, f"{v:.4f}", f"{batch_size / v:.0f}", *([f"{cpu[k]:.4f}"] if cpu else []),
                      str(result["ops_per_step"][k]))
    console = _console()
    console.print(table)
    console.print(f"CL / (IL sum), {result['ratio_clock']} time = [bold]{result['ratio_cl_over_il_sum']:.3f}[/] "
                  f"(goal <= {result['goal_ratio']}: {'met' if result['goal_met'] else 'not met'}); wall time "
                  f"{result['ratio_wall']:.3f}; aten ops {result['ops_ratio_cl_over_il_sum']:.3f}")
    for site in result["mkb"]:
        console.print(f"MKB at {site['site']} ({' / '.join(site['taps'])}): embedding {site['embedding']}, params +"
                      + " / ".join(f"{100 * f:.1f}%" for f in site["param_overhead"]) + ", MACs +"
                      + " / ".join(f"{100 * f:.1f}%" for f in site["mac_overhead"]))
    if "pipeline" in result:
        p = result["pipeline"]
        console.print(f"data pipeline: {p['images_per_s']:,.0f} images/s ({p['ratio_pipeline_over_cl_step']:.0f}x "
                      f"what the CL step consumes)")
    if "w2" in result:
        w = result["w2"]
        console.print(f"W2 (different inputs), {w['pairs_per_step']} pairs: {w['seconds_per_step_uncached']:.3f} s "
                      f"per step to solve ({w['uncached_over_cl_step']:.2f}x the CL step; first epoch), "
                      f"{w['seconds_per_step_cached'] * 1e3:.2f} ms once cached")
    if "wel" in result:
        w = result["wel"]
        console.print(f"WEL step ({w['pairs_per_step']} fixed pairs a batch): {w['seconds_per_step_new_pairs']:.3f} s "
                      f"with new pairs (first epoch), {w['seconds_per_step_cached']:.3f} s once cached")


@app.command()
def compare(
    recipe: str = typer.Option("quickstart", "--recipe", "-r", help="built-in recipe name or a YAML file"),
    methods: str = typer.Option("il,el,kd,fitnets,dml,wel,mkb-solo,cl", "--methods",
                                help="comma separated; IL always runs (reference, teacher, EL)"),
    seeds: int = typer.Option(3, "--seeds", help="seeds per method: the recipe's seed, +1, +2, ..."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="report folder (default reports/<recipe>); the runs/ "
                                       "inside it are reused"),
    data: Optional[str] = typer.Option(None, "--data", help="local dataset folder (or hub id) replacing the recipe's"),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    overrides: List[str] = typer.Option([], "--set", help="recipe override key=value (dotted keys)"),
    log: Optional[str] = typer.Option(None, "--log", help="log each run to experiment trackers: tensorboard, "
                                      "wandb, mlflow (comma separated for several; train.log)"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no live progress bar"),
) -> None:
    """Train every method on the same recipe and seeds, and write their comparison (paper Table 2).

    Writes table.md, results.csv, curves.png and per_class.md; with --log, every run goes to the trackers, grouped."""
    from rich.table import Table

    from clcli import recipes
    from clcli.compare import compare as compare_lib, parse_methods

    names = parse_methods(methods)
    console = _console()
    loaded = recipes.resolve(recipe, data=data, epochs=epochs, log=_trackers(log), overrides=overrides)
    out = out if out is not None else Path("reports") / loaded.name
    with _reported_interrupt():
        result = compare_lib(loaded, names, seeds, out, show_progress=not no_progress, console=console)
    seeds_text = ", ".join(map(str, result["seeds"]))
    table = Table(title=f"test accuracy (%), mean ± std over seeds {seeds_text}", title_justify="left",
                  caption=result["label_note"], caption_justify="left")
    table.add_column("method")
    table.add_column(" / ".join(result["networks"]))
    for label, cell in result["rows"]:
        table.add_row(label, cell)
    console.print(table)
    for what, path in result["paths"].items():
        console.print(f"{what}: [bold]{path}[/]")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def tune(
    ctx: typer.Context,
    recipe: str = typer.Option("quickstart", "--recipe", "-r", help="built-in recipe name or a YAML file; its tune "
                               "section is the search space"),
    models: Optional[str] = typer.Option(None, "--models", help="timm model names (space separated)"),
    data: Optional[str] = typer.Option(None, "--data", help="local dataset folder (or hub id) replacing the recipe's"),
    overrides: List[str] = typer.Option([], "--set", help="recipe override key=value (dotted keys)"),
    out: Path = typer.Option(Path("tune"), "--out", "-o", help="study folder: trials/NNN run folders, study.db, "
                             "study.md, best.yaml"),
    log: Optional[str] = typer.Option(None, "--log", help="log each trial to experiment trackers, grouped: "
                                      "tensorboard, wandb, mlflow (comma separated)"),
    trials: int = typer.Option(20, "--trials", help="finished trials the study ends with, IL (trial 0) included"),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="each trial's budget (default: the recipe's)"),
    study: Optional[str] = typer.Option(None, "--study", help="study name (default: the --out folder's name)"),
    storage: Optional[str] = typer.Option(None, "--storage", help="an Optuna storage shared by several processes or "
                                          "machines: a database URL (postgresql://, mysql://, sqlite:///) or a "
                                          "journal file (default: OUT/study.db)"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no live progress bar"),
) -> None:
    """Search where the MKB helps this pair on this data, and how strongly, with Optuna on a validation split.

    Each trial is a run folder; pruned trials stop early; the same command continues an interrupted study."""
    from rich.table import Table

    from clcli import recipes
    from clcli.tune import require_optuna, tune as tune_lib

    require_optuna()  # the missing extra: one line before any work
    console = _console()
    if models is None and ctx.args:
        raise ClcliError(f"unexpected arguments: {' '.join(ctx.args)}")
    loaded = recipes.resolve(recipe, data=data, models=[models, *ctx.args] if models is not None else None,
                             log=_trackers(log), overrides=overrides)
    with _reported_interrupt():
        result = tune_lib(loaded, out, trials=trials, epochs=epochs, study_name=study, storage=storage,
                          show_progress=not no_progress, console=console)
    networks = list(next((r["val_acc"] for r in result["rows"] if r["val_acc"]), {}))
    table = Table(title="trials: validation accuracy (%), in brackets the difference to IL (trial "
                  f"{result['il']}) at the same epoch", title_justify="left")
    for column in ("trial", "state", "sites", "alpha", *networks):
        table.add_column(column, no_wrap=True)  # one column per network keeps two networks whole at 80 columns
    for r in result["rows"]:
        state = f"pruned at {r['epochs']}" if r["state"] == "pruned" and r["epochs"] else r["state"]
        table.add_row(str(r["trial"]), state, "IL" if r["method"] == "il" else r["sites"],
                      "" if r["alpha"] is None else f"{r['alpha']:.3g}",
                      *(_with_difference(r, n) for n in networks))
    console.print(table)
    console.print(result["verdict"], highlight=False, soft_wrap=True)
    for what, path in result["paths"].items():
        console.print(f"{what}: [bold]{path}[/]")


def _with_difference(row: dict, network: str) -> str:
    if network not in row["val_acc"]:
        return ""
    text = f"{row['val_acc'][network]:.2f}"
    return f"{text} ({row['minus_il'][network]:+.2f})" if network in row["minus_il"] else text


@app.command()
def report(
    runs: List[Path] = typer.Argument(..., help="run folders (a multi-method folder gives each method's run)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="PNG to write (default: RUN/curves.png for one "
                                       "folder, else report.png here)"),
) -> None:
    """Draw the training curves of one or several runs side by side, and each network's confusion matrix.

    Per network: the training loss parts and test accuracy per epoch; with several runs, the per-class differences."""
    from clcli.plots import report as report_lib

    path, (width, height), drawn, per_class = report_lib(runs, out)
    console = _console()
    console.print(f"{len(drawn)} run{'s' if len(drawn) > 1 else ''} drawn: [bold]{path}[/] ({width}x{height} px)",
                  highlight=False)
    if per_class is not None:
        console.print(f"confusion matrices and per-class accuracy: [bold]{per_class}[/]", highlight=False)


def main() -> None:
    try:
        app()
    except ClcliError as e:
        from rich.markup import escape

        # escaped: a message may hold brackets (pip install "clcli[wandb]") that rich would take for markup
        _console(stderr=True).print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
