"""Training and test accuracy of finished runs, both measured on un-augmented images (docs/results.md section 5).

The running accuracy a run logs is over augmented batches (and, under mixup/cutmix, against mixed targets), so it
is no measure of how well a network fits its training images. This reads each run's last checkpoint, rebuilds the
cohort (each network with its own MKB halves, as deployed; the EMA weights too where the run kept them) and
evaluates every network on the run's own training images (its recipe's `data.train_limit`) and on its test images.
The test accuracy must equal what the run recorded at its last epoch: the script stops if it does not.

    python scripts/train_accuracy.py reports/overfit/paper reports/overfit/current --out train_accuracy.json

Each REPORT is a `clcli compare --out` folder (runs/METHOD/seedN) or a run folder; results are merged into --out
(a run already there is skipped), so it resumes.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from clcli.data import load_data
from clcli.evaluation import evaluate
from clcli.files import write_json
from clcli.run import Run, read_metrics


def run_folders(report: Path) -> list[Path]:
    if (report / "run.json").exists():
        return [report]
    return sorted(p.parent for p in report.glob("runs/*/seed*/run.json"))


def measure(path: Path) -> dict:
    run = Run.open(path)
    if not run.finished:
        raise SystemExit(f"{path}: not finished")
    data = load_data(run.recipe, torch.device("cpu"))
    last = [r for r in read_metrics(path) if r.get("type") == "epoch"][-1]
    result = {"method": run.method, "seed": run.recipe.train.seed, "epoch": last["epoch"],
              "train_images": len(data.train_labels), "networks": {}}
    weights = ["last"] + (["ema"] if "ema" in run.state() else [])
    for kind in weights:
        cohort = run.cohort(kind)
        for name, net in zip(cohort.labels, cohort.networks):
            test = evaluate(net, data.test_images, data.test_labels, data.mean, data.std)["top1"]
            recorded = (last["test_acc"] if kind == "last" else last["ema_test_acc"])[name]
            if not math.isclose(test, recorded, abs_tol=0.011):  # run.json / metrics keep two decimals
                raise SystemExit(f"{path} {name} ({kind}): test accuracy {test:.2f} here, {recorded} recorded")
            train = evaluate(net, data.train_images, data.train_labels, data.mean, data.std)["top1"]
            result["networks"].setdefault(name, {})[kind] = {"train_acc": round(train, 2), "test_acc": round(test, 2),
                                                              "gap": round(train - test, 2)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("train_accuracy.json"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for report in args.reports:
        for path in run_folders(report):
            key = str(path)
            if key in results:
                continue
            results[key] = measure(path)
            write_json(args.out, results)
            nets = results[key]["networks"]
            print(key, {n: {k: (v["train_acc"], v["test_acc"]) for k, v in w.items()} for n, w in nets.items()},
                  flush=True)


if __name__ == "__main__":
    main()
