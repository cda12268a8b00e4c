"""Does every timm family train with MKBs? One representative per family (the `timm.models` module that registers
it; its smallest model by parameter count), paired with one fixed partner, in three settings:

    a  32 px, --stem small
    b  32 px, ImageNet stems
    c  the representative's own input size (its pretrained_cfg), the partner at the same size

For each: the whole user path on random images (8, batch 4): `clcli train` (probe, build the MKBs, one epoch of two CL steps,
checkpoint), `export --split`, `clcli.load`, and each loaded network's outputs compared with the trained network's
(bit for bit). Each setting runs in its own worker process with a time limit and a memory cap.

    python benchmarks/train_zoo.py --out docs/results/train_zoo.json                  # every family (resumable)
    python benchmarks/train_zoo.py --out /tmp/z.json --families resnet,pit --retry    # some families again
    python benchmarks/train_zoo.py --out docs/results/train_zoo.json --markdown       # the tables of docs/results.md

The JSON is rewritten after every setting; settings already in it are skipped (`--retry` redoes those of the
named families, `--retry-failed` every setting that is not ok). Per setting the result is `ok`, `refused` (a one-line
ClcliError: what the CLI prints with exit 2), `bug` (any other exception: a traceback, with where it was raised) or
`timeout`.
"""
from __future__ import annotations

import argparse
import json
import resource
import signal
import sys
import tempfile
import time
import traceback
from multiprocessing import get_context
from pathlib import Path

PARTNER = "mobilenetv3_small_050"
SETTINGS = {"a": ("32px --stem small", "small"), "b": ("32px imagenet stems", "imagenet"),
            "c": ("own input size", "imagenet")}
# One epoch = two CL steps. Batch 4, not 2: at batch 2 two steps of the verification term drive some networks to
# NaN outputs (mobilenetv3_small_050's stem weights x200 beside test_byobnet), a harness artefact, not an export one.
TEST_IMAGES, BATCH = 2, 4


def _limit_memory(gib: float) -> None:
    limit = int(gib * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def representative(family: str) -> tuple[str, int]:
    """The family's smallest registered model by parameter count (built on the meta device)."""
    import torch
    import timm

    best = None
    for name in timm.list_models(module=family):
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False)
        except Exception:  # noqa: BLE001 - a model that does not build is not a representative
            continue
        params = sum(p.numel() for p in model.parameters())
        if best is None or params < best[1]:
            best = (name, params)
    if best is None:
        raise RuntimeError(f"no model of {family} builds")
    return best


def own_input_size(name: str) -> int:
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    size = tuple(cfg.input_size[-2:]) if cfg is not None and cfg.input_size else (224, 224)
    return max(size)  # recipes train on square inputs


def _random_image_folder(root: Path, size: int, train_images: int) -> Path:
    """class folders of random PNGs: train/ (train_images) and test/ (TEST_IMAGES), two classes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train_images), ("test", TEST_IMAGES)):
        for i in range(n):
            folder = root / split / f"class{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def run_setting(model: str, partner: str, size: int, stem: str, work: Path, batch: int = BATCH,
                memory_options: dict | None = None) -> None:
    """train -> export --split -> clcli.load -> outputs equal. Raises on any failure. `memory_options`: recipe
    `train` keys for the largest models (grad_checkpointing, accumulate)."""
    import torch

    import clcli
    from clcli import recipes
    from clcli.export import export_run
    from clcli.run import Run
    from clcli.train import train

    data = _random_image_folder(work / "data", size, train_images=2 * batch)
    recipe = recipes.from_dict({
        "name": "train_zoo", "models": [model, partner], "methods": ["cl"], "input_size": size, "stem": stem,
        "data": {"source": str(data), "augment": "none", "normalize": "none"},
        "train": {"epochs": 1, "batch_size": batch, "lr": 0.01, "schedule": "constant", "log_every": 1,
                  "threads": 1, "device": "cpu", **(memory_options or {})},
    })
    run_dir = work / "run"
    train(recipe, run_dir, show_progress=False)
    export_run(run_dir, work / "exported", measure=False)
    cohort = Run.pick(run_dir).cohort()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for label, net in zip(cohort.labels, cohort.networks):
            loaded = clcli.load(work / "exported" / f"{label}.safetensors")
            if not same_outputs(loaded(x), net(x)):
                raise AssertionError(f"{label}: the loaded export's outputs differ from the trained network's")


def same_outputs(a, b) -> bool:
    """Bit for bit, NaN where NaN: two random-data steps can drive a network's outputs to NaN (at batch 2, through
    CL's verification term), and the export must reproduce that network too."""
    import torch

    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a.masked_fill(nan, 0), b.masked_fill(nan, 0))


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {Path(f.filename).name}:{f.lineno} in {f.name})"


def _alarm(timeout: int):
    def handler(signum, frame):
        raise TimeoutError(f"over {timeout}s")

    signal.signal(signal.SIGALRM, handler)
    signal.alarm(timeout)


def _find_representative(args) -> dict:
    family, timeout = args
    from clcli.errors import one_line

    start = time.perf_counter()
    try:
        _alarm(timeout)
        model, params = representative(family)
        entry = {"family": family, "model": model, "params": params, "own_size": own_input_size(model)}
    except BaseException as e:  # noqa: BLE001 - recorded, the sweep goes on
        entry = {"family": family, "error": one_line(e)}
    finally:
        signal.alarm(0)
    entry["search_seconds"] = round(time.perf_counter() - start, 1)
    return entry


def _run_setting(args) -> tuple[str, str, dict]:
    family, key, model, own_size, timeout, batch, memory_options = args
    import torch

    from clcli.errors import ClcliError, one_line

    torch.set_num_threads(1)
    label, stem = SETTINGS[key]
    size = own_size if key == "c" else 32
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="train_zoo_") as tmp:
        try:
            _alarm(timeout)
            run_setting(model, PARTNER, size, stem, Path(tmp), batch, memory_options)
            result = {"status": "ok"}
        except ClcliError as e:
            result = {"status": "refused", "error": str(e)}
        except TimeoutError as e:
            result = {"status": "timeout", "error": str(e)}
        except BaseException as e:  # noqa: BLE001 - a traceback: a bug to fix
            result = {"status": "bug", "error": one_line(e, 300) + _where(e)}
        finally:
            signal.alarm(0)
    result.update(setting=label, input_size=size, batch=batch, seconds=round(time.perf_counter() - start, 1),
                  **memory_options)
    return family, key, result


def _init(gib: float) -> None:
    import logging
    import os
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("CLCLI_CACHE", tempfile.mkdtemp(prefix="train_zoo_cache_"))
    _limit_memory(gib)


def summarise(families: dict, settings) -> dict:
    summary: dict = {"families": len(families), "partner": PARTNER}
    for key in settings:
        statuses = [f.get("settings", {}).get(key, {}).get("status", "error") for f in families.values()]
        summary[key] = {"setting": SETTINGS[key][0],
                        **{s: statuses.count(s) for s in ("ok", "refused", "bug", "timeout", "error")}}
    return summary


def markdown(results: dict) -> str:
    """The JSON as docs/results.md shows it: counts per setting, then every family with a setting not ok."""
    summary, families = results["summary"], results["families"]
    lines = ["| setting | ok | refused (one line, exit 2) | bug | timeout |", "|---|---|---|---|---|"]
    for key, (label, _) in SETTINGS.items():
        c = summary[key]
        lines.append(f"| ({key}) {label} | {c['ok']} | {c['refused']} | {c['bug']} | {c['timeout']} |")
    lines += ["", "| family (representative) | setting | result |", "|---|---|---|"]
    for family, f in families.items():
        for key, r in sorted(f.get("settings", {}).items()):
            if r["status"] != "ok":
                error = r.get("error", "").replace("|", "\\|")
                lines.append(f"| {family} ({f.get('model', '?')}) | ({key}) | {r['status']}: {error[:220]} |")
    return "\n".join(lines)


def recorded(out: Path) -> dict:
    """The families a results file (train_zoo's, onnx_zoo's) holds already: a re-run resumes from them."""
    return json.loads(out.read_text()).get("families", {}) if out.is_file() else {}


def chosen_families(names: str, parser: argparse.ArgumentParser) -> list[str]:
    """--families as timm.models modules (default: every one); an unknown name stops the script."""
    import timm

    every = timm.models.list_modules()
    families = [f for f in names.split(",") if f] or sorted(every)
    unknown = sorted(set(families) - set(every))
    if unknown:
        parser.error(f"not timm.models modules: {', '.join(unknown)} (e.g. sequencer, not sequencer2d)")
    return families


def zoo_parser(doc: str, out: str, *, workers: int, timeout_help: str) -> argparse.ArgumentParser:
    """The options every zoo sweep takes (train_zoo, onnx_zoo): where results go, their markdown, the workers, the
    families, the time limit and the memory cap."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=out)
    parser.add_argument("--markdown", action="store_true", help="print --out's results as markdown and stop")
    parser.add_argument("--workers", type=int, default=workers)
    parser.add_argument("--families", default="", help="comma-separated timm.models modules (default: all)")
    parser.add_argument("--timeout", type=int, default=300, help=timeout_help)
    parser.add_argument("--memory-gib", type=float, default=8.0, help="address-space cap per worker")
    return parser


def main() -> None:
    parser = zoo_parser(__doc__, "train_zoo.json", workers=2, timeout_help="seconds per setting")
    parser.add_argument("--settings", default="abc")
    parser.add_argument("--retry", action="store_true", help="redo the named families even if recorded")
    parser.add_argument("--retry-failed", action="store_true", help="redo every setting that is not ok")
    parser.add_argument("--retry-status", default="", help="with --retry-failed: only settings of these statuses "
                        "(comma-separated, e.g. bug,timeout)")
    parser.add_argument("--batch", type=int, default=BATCH, help="batch size (two steps: 2 x batch training images); "
                        "2 fits the largest models at their own size in memory")
    parser.add_argument("--grad-checkpointing", action="store_true", help="train with train.grad_checkpointing "
                        "(for the largest models at their own size)")
    parser.add_argument("--accumulate", type=int, default=1, help="train.accumulate: each step's batch in this many "
                        "micro-batches (less memory)")
    args = parser.parse_args()

    out = Path(args.out)
    if args.markdown:
        print(markdown(json.loads(out.read_text())))
        return

    from clcli import files

    done = recorded(out)
    families = chosen_families(args.families, parser)

    retry_statuses = {s for s in args.retry_status.split(",") if s}

    def wanted(family: str, key: str) -> bool:
        result = done.get(family, {}).get("settings", {}).get(key)
        return (result is None or args.retry and args.families
                or args.retry_failed and result.get("status") != "ok"
                and (not retry_statuses or result.get("status") in retry_statuses))

    def save() -> None:
        ordered = dict(sorted(done.items()))
        files.write_json(out, {"summary": summarise(ordered, SETTINGS), "families": ordered})

    start = time.perf_counter()
    ctx = get_context("spawn")
    # One process per task: a model that leaks memory or hangs takes only its own setting down.
    with ctx.Pool(args.workers, initializer=_init, initargs=(args.memory_gib,), maxtasksperchild=1) as pool:
        search = [f for f in families if "model" not in done.get(f, {})]
        print(f"finding the smallest model of {len(search)} families", file=sys.stderr, flush=True)
        for entry in pool.imap_unordered(_find_representative, [(f, args.timeout) for f in search]):
            done[entry["family"]] = {**done.get(entry["family"], {}), **entry}
            save()
        memory_options = {**({"grad_checkpointing": True} if args.grad_checkpointing else {}),
                          **({"accumulate": args.accumulate} if args.accumulate > 1 else {})}
        tasks = [(f, k, done[f]["model"], done[f]["own_size"], args.timeout, args.batch, memory_options)
                 for f in families if "model" in done[f] for k in args.settings if wanted(f, k)]
        print(f"{len(tasks)} settings to run", file=sys.stderr, flush=True)
        for i, (family, key, result) in enumerate(pool.imap_unordered(_run_setting, tasks), 1):
            done[family].setdefault("settings", {})[key] = result
            print(f"{i}/{len(tasks)} {family} ({done[family]['model']}) {key}: {result['status']} "
                  f"{result.get('error', '')[:160]} [{time.perf_counter() - start:.0f}s]", file=sys.stderr,
                  flush=True)
            save()
    summary = summarise(dict(sorted(done.items())), SETTINGS)
    summary.update(last_run_seconds=round(time.perf_counter() - start, 1), last_run_workers=args.workers,
                   last_run_tasks=len(tasks))
    files.write_json(out, {"summary": summary, "families": dict(sorted(done.items()))})
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
