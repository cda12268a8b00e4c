"""The Python phases of scripts/device_run.sh (the one GPU device run); each writes one JSON file.

    python scripts/device_phases.py env OUT/env.json [--dry]
    python scripts/device_phases.py bench OUT/bench.json EAGER.json [COMPILED.json]
    python scripts/device_phases.py cifar10 OUT/cifar10.json --deadline UNIX_TIME [--bench OUT/bench.json] [--dry]
    python scripts/device_phases.py phases OUT/env.json NAME=RC:SECONDS ...
    python scripts/device_phases.py deps    # the image's packages satisfy the carried `datasets`, or which does not
    python scripts/device_phases.py dry-clcli ARGS...    # clcli ARGS, torch.compile with the `eager` backend

`cifar10` trains CL, then IL, of the paper's pair on full CIFAR-10 from the same initial weights and data order (one
recipe, one seed), for as many epochs as fit before the deadline: the count comes from the step times measured by
the bench phase (or measured here if that phase failed) and the measured decode time, and is printed before
training starts. With --dry everything runs on the CPU with tiny models and a few hundred shipped images.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAIR = ["resnet34", "mobilenetv2_100"]
TINY_PAIR = ["test_resnet", "test_efficientnet"]
CIFAR10 = REPO / ".device" / "cifar10"
# An epoch's time beyond its training steps (augmentation, logging, evaluation of 10,000 images per network,
# checkpoint) is not in the bench's step time: the estimate pads the steps by this factor plus EPOCH_EXTRA_S.
STEP_PAD = 1.2
EPOCH_EXTRA_S = 2.0


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "?"))
    except Exception as e:  # a missing or broken package is what this file is for
        return f"error: {type(e).__name__}: {e}"


def env(out: Path, dry: bool) -> None:
    import torch

    commit_file = REPO / ".device" / "commit"
    info = {
        "dry": dry,
        "clcli_commit": commit_file.read_text().strip() if commit_file.is_file() else _git_commit(),
        "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "packages": {m: _version(m) for m in ("clcli", "timm", "numpy", "datasets", "ot", "pyarrow", "fsspec",
                                               "huggingface_hub", "safetensors", "typer", "rich", "triton")},
        "clcli_file": _module_file("clcli"),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
                       "multiprocessors": p.multi_processor_count, "bf16": torch.cuda.is_bf16_supported(including_emulation=False),
                       "count": torch.cuda.device_count()}
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            info["nvidia_smi"] = f"error: {e}"
    write_json(out, info)
    print(json.dumps(info, indent=2))


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _module_file(name: str) -> str:
    try:
        return str(__import__(name).__file__)
    except Exception as e:
        return f"error: {e}"


def phases(env_file: Path, items: list[str]) -> None:
    """Adds {"phases": {name: {"rc", "seconds"}}} to env.json (rc 124: stopped at its time cap)."""
    info = json.loads(env_file.read_text()) if env_file.is_file() else {}
    info["phases"] = {}
    for item in items:
        name, rest = item.split("=", 1)
        rc, seconds = rest.split(":")
        info["phases"][name] = {"rc": int(rc), "seconds": int(seconds)}
    write_json(env_file, info)


# --- deps -------------------------------------------------------------------------------------------------------

# What the carried `datasets` needs of packages the H200 image has and the run does not carry (.whl/).
IMAGE_PACKAGES = ("pyarrow", "huggingface-hub", "tqdm")


def deps() -> int:
    """Whether the installed pyarrow, huggingface_hub and tqdm satisfy what the installed `datasets` requires: one
    line per package, and exit code 1 naming the first that does not (before any phase imports `datasets`)."""
    from importlib.metadata import PackageNotFoundError, distribution, version

    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip carries its own copy
        from pip._vendor.packaging.requirements import Requirement

    datasets = distribution("datasets")
    failed = None
    for text in datasets.requires or []:
        req = Requirement(text)
        name = req.name.lower().replace("_", "-")
        if name not in IMAGE_PACKAGES or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        try:
            have = version(req.name)
        except PackageNotFoundError:
            have = None
        ok = have is not None and req.specifier.contains(have, prereleases=True)
        print(f"datasets {datasets.version} needs {name}{req.specifier or ''}: {have or 'missing'} "
              f"{'ok' if ok else 'NOT SATISFIED'}")
        if not ok and failed is None:
            failed = f"{name}{req.specifier} (the image has {have or 'none'})"
    if failed:
        print(f"stop: the carried datasets {datasets.version} needs {failed}; carry a wheel of it in .whl/ "
              "(scripts/device_prepare.sh)")
        return 1
    return 0


# --- bench ------------------------------------------------------------------------------------------------------


def _bench_summary(result: dict) -> dict:
    steps = result["step_seconds"]
    il = {k: v for k, v in steps.items() if k.startswith("il:")}
    batch = result["batch_size"]
    return {
        "ms_per_step": {k: round(1e3 * v, 3) for k, v in steps.items()},
        "images_per_s": {k: round(batch / v, 1) for k, v in steps.items()},
        "il_sum_ms": round(1e3 * sum(il.values()), 3),
        "ratio_cl_over_il_sum_wall": result["ratio_wall"],
        "aten_ops": result["ops_per_step"],
    }


def bench(out: Path, eager_file: Path, compiled_file: Path | None) -> None:
    merged: dict = {}
    for name, path in (("eager", eager_file), ("compiled", compiled_file)):
        if path is None:
            continue
        try:
            result = json.loads(path.read_text())
            merged[name] = {"summary": _bench_summary(result), "result": result}
        except (OSError, ValueError, KeyError) as e:
            merged[name] = {"error": f"{type(e).__name__}: {e} (see the log)"}
    if all("summary" in merged.get(k, {}) for k in ("eager", "compiled")):
        e, c = merged["eager"]["summary"]["ms_per_step"], merged["compiled"]["summary"]["ms_per_step"]
        merged["compiled_over_eager"] = {k: round(c[k] / e[k], 4) for k in e}
    write_json(out, merged)
    for name in ("eager", "compiled"):
        s = merged.get(name, {}).get("summary")
        if s:
            print(f"{name:9s} " + "  ".join(f"{k} {v:.2f} ms" for k, v in s["ms_per_step"].items())
                  + f"  CL/(IL sum) {s['ratio_cl_over_il_sum_wall']:.3f}")
        elif name in merged:
            print(f"{name:9s} {merged[name]['error']}")


# --- CIFAR-10 -----------------------------------------------------------------------------------------------------


class _EpochClock:
    """Times each epoch of a run as it happens: a thread follows metrics.jsonl and notes when each epoch record
    appears (the loop writes it after the epoch's evaluation, before its checkpoint)."""

    def __init__(self, path: Path):
        self.path, self.times, self.start = path, [], time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        offset, pending = 0, ""
        while not self._stop.is_set():
            if self.path.is_file():
                with open(self.path) as f:
                    f.seek(offset)
                    chunk = f.read()
                    offset = f.tell()
                pending += chunk
                *lines, pending = pending.split("\n")
                now = time.perf_counter()
                self.times += [now for line in lines if '"type": "epoch"' in line]
            self._stop.wait(0.02)

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join()
        marks = [self.start, *self.times]
        return [round(b - a, 3) for a, b in zip(marks, marks[1:])]


def _recipe(dry: bool, method: str, epochs: int):
    from clcli import recipes
    from clcli.data import QUICKSTART_DIR

    sets = [f"methods=[{method}]", f"train.epochs={max(epochs, 1)}", "train.schedule=cosine", "train.lr=0.1",
            "train.momentum=0.9", "train.weight_decay=0.0005", "train.seed=0", "data.augment=crop_flip"]
    if dry:
        sets += [f"models=[{', '.join(TINY_PAIR)}]", f"data.source={QUICKSTART_DIR}", "data.train_limit=320",
                 "data.test_limit=200", "train.batch_size=32", "train.device=cpu", "train.threads=1",
                 "train.log_every=5"]
    else:
        sets += [f"models=[{', '.join(PAIR)}]", f"data.source={CIFAR10}", "train.batch_size=128",
                 "train.device=cuda", "train.log_every=50"]
    return recipes.load("cifar10", sets)


def _measured_step_seconds(bench_file: Path | None, dry: bool) -> tuple[dict, str]:
    """{"il": IL A + IL B, "cl": CL} seconds per step: from the bench phase's eager run, else measured here."""
    if bench_file is not None and bench_file.is_file():
        try:
            result = json.loads(bench_file.read_text())["eager"]["result"]
            steps = result["step_seconds"]
            return ({"il": sum(v for k, v in steps.items() if k.startswith("il:")), "cl": steps["cl"]},
                    f"bench phase ({bench_file.name}, eager)")
        except (OSError, ValueError, KeyError):
            pass
    from clcli.bench import make_steps, time_steps

    recipe = _recipe(dry, "cl", 1)
    steps, _, dev = make_steps(list(recipe.models), batch_size=recipe.train.batch_size, device=recipe.train.device)
    times = time_steps(steps, dev, min_rounds=5, min_seconds=2.0)
    med = {k: statistics.median(v["wall"]) for k, v in times.items()}
    return ({"il": sum(v for k, v in med.items() if k.startswith("il:")), "cl": med["cl"]},
            "measured in this phase (bench.json had none)")


class _Deadline(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Deadline()


def _read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cifar10(out: Path, deadline: float, bench_file: Path | None, dry: bool, work: Path) -> None:
    import torch

    from clcli import train as train_lib

    report: dict = {"dry": dry, "status": "started"}
    t0 = time.time()
    # Decode once (the clcli cache keeps the uint8 tensors: both runs below read them back in a moment).
    recipe = _recipe(dry, "cl", 1)
    data = train_lib.load_data(recipe, torch.device("cpu"))
    report["decode_seconds"] = round(time.time() - t0, 2)
    report["train_images"], report["test_images"] = len(data.train_labels), len(data.test_labels)
    steps_per_epoch = len(data.train_labels) // recipe.train.batch_size
    del data
    step, source = _measured_step_seconds(bench_file, dry)
    epoch_estimate = {k: STEP_PAD * steps_per_epoch * v + EPOCH_EXTRA_S for k, v in step.items()}
    left = deadline - time.time() - 10.0  # reload, model build and the first epoch's warm-up
    epochs = 1 if dry else max(1, min(200, math.floor(left / (epoch_estimate["il"] + epoch_estimate["cl"]))))
    report.update({
        "models": list(recipe.models), "stem": recipe.stem, "batch_size": recipe.train.batch_size,
        "optimizer": "SGD lr 0.1 momentum 0.9 weight decay 5e-4, cosine per step", "augment": "crop (pad 4) + flip",
        "amp": "bf16 autocast on CUDA", "seed": 0, "steps_per_epoch": steps_per_epoch,
        "step_seconds_used": {k: round(v, 5) for k, v in step.items()}, "step_seconds_from": source,
        "epoch_seconds_estimate": {k: round(v, 2) for k, v in epoch_estimate.items()},
        "seconds_left_at_plan": round(left, 1), "epochs": epochs, "methods": {},
    })
    print(f"CIFAR-10 plan: {epochs} epoch(s) each for CL and IL; estimated {epoch_estimate['cl']:.1f} s (CL) + "
          f"{epoch_estimate['il']:.1f} s (IL) per epoch from step times ({source}); {left:.0f} s left; decode "
          f"{report['decode_seconds']} s", flush=True)
    write_json(out, report)
    signal.signal(signal.SIGALRM, _on_alarm)
    for method in ("cl", "il"):  # CL first: if the estimate was wrong, the deadline cuts IL, not CL
        run_dir = work / f"cifar10-{method}"
        clock = _EpochClock(run_dir / "metrics.jsonl")
        entry: dict = {"run_dir": str(run_dir)}
        start = time.perf_counter()
        remaining = int(deadline - time.time())
        try:
            if remaining < 5:
                raise _Deadline()
            signal.alarm(remaining)
            summary = train_lib.train(_recipe(dry, method, epochs), run_dir, force=True, show_progress=False)
            entry["status"] = "finished"
            entry["final_test_acc"] = summary[method]["test_acc"]
        except _Deadline:
            entry["status"] = "stopped at the deadline"
        except Exception as e:  # recorded, so that the other method still runs and the file says what broke
            entry["status"] = f"failed: {type(e).__name__}: {e}"
        finally:
            signal.alarm(0)
        entry["wall_seconds"] = round(time.perf_counter() - start, 2)
        entry["epoch_seconds"] = clock.stop()  # the first one includes building the models and warm-up
        records = _read_metrics(run_dir)
        epochs_done = [r for r in records if r.get("type") == "epoch"]
        entry["epochs_done"] = len(epochs_done)
        entry["test_acc_per_epoch"] = [r["test_acc"] for r in epochs_done]
        rates = [r["images_per_s"] for r in records if r.get("type") == "step" and r.get("epoch", 0) >= 1]
        if rates:  # training steps alone (after the first epoch), from the loop's own images/s windows
            entry["train_images_per_s_median"] = statistics.median(rates)
            entry["train_seconds_per_epoch"] = round(report["train_images"] / statistics.median(rates), 3)
        steady = entry["epoch_seconds"][1:]
        if steady:
            entry["epoch_seconds_median_after_first"] = statistics.median(steady)
        report["methods"][method] = entry
        write_json(out, report)
        print(f"{method}: {entry['status']}, {entry['epochs_done']} epoch(s), {entry['wall_seconds']} s, epoch "
              f"seconds {entry['epoch_seconds']}, last test acc "
              f"{entry['test_acc_per_epoch'][-1] if entry['test_acc_per_epoch'] else None}", flush=True)
    cl, il = report["methods"]["cl"], report["methods"]["il"]
    if cl.get("epoch_seconds_median_after_first") and il.get("epoch_seconds_median_after_first"):
        report["cl_over_il_epoch_seconds"] = round(
            cl["epoch_seconds_median_after_first"] / il["epoch_seconds_median_after_first"], 4)
    if cl["test_acc_per_epoch"] and il["test_acc_per_epoch"] and cl["epochs_done"] == il["epochs_done"]:
        last_cl, last_il = cl["test_acc_per_epoch"][-1], il["test_acc_per_epoch"][-1]
        report["cl_minus_il_test_acc"] = {k: round(last_cl[k] - last_il[k], 3) for k in last_cl}
    report["status"] = "done"
    write_json(out, report)
    print(json.dumps({k: report.get(k) for k in ("epochs", "cl_over_il_epoch_seconds", "cl_minus_il_test_acc")}))


def dry_clcli(args: list[str]) -> None:
    """`clcli ARGS` with torch.compile on dynamo's `eager` backend: the rehearsal captures the networks as on the
    GPU but generates no kernels (inductor's C++ build takes minutes on a shared 2-core CPU)."""
    import functools

    import torch

    torch.nn.Module.compile = functools.partialmethod(torch.nn.Module.compile, backend="eager")
    from clcli.cli import main as clcli_main

    sys.argv = ["clcli", *args]
    clcli_main()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["dry-clcli"]:
        return dry_clcli(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="phase", required=True)
    p = sub.add_parser("env")
    p.add_argument("out", type=Path)
    p.add_argument("--dry", action="store_true")
    p = sub.add_parser("bench")
    p.add_argument("out", type=Path)
    p.add_argument("eager", type=Path)
    p.add_argument("compiled", type=Path, nargs="?")
    p = sub.add_parser("cifar10")
    p.add_argument("out", type=Path)
    p.add_argument("--deadline", type=float, required=True, help="unix time by which training must stop")
    p.add_argument("--bench", type=Path)
    p.add_argument("--work", type=Path, required=True, help="folder for the run folders")
    p.add_argument("--dry", action="store_true")
    p = sub.add_parser("phases")
    p.add_argument("env_file", type=Path)
    p.add_argument("items", nargs="*")
    sub.add_parser("deps")
    args = parser.parse_args(argv)
    if args.phase == "deps":
        return deps()
    if args.phase == "env":
        env(args.out, args.dry)
    elif args.phase == "bench":
        bench(args.out, args.eager, args.compiled)
    elif args.phase == "cifar10":
        cifar10(args.out, args.deadline, args.bench, args.dry, args.work)
    else:
        phases(args.env_file, args.items)


if __name__ == "__main__":
    sys.exit(main())
