"""The tables of docs/results.md section 5 from what scripts/cifar10_overfit.sh and scripts/train_accuracy.py wrote.

    python scripts/overfit_report.py reports/overfit          # reads OUT/RECIPE/results.csv, OUT/train_accuracy.json

For every `clcli compare` folder under OUT (paper, current, ...): test accuracy mean ± std over seeds per method and network, each
seed's difference to IL of the same seed (and their mean ± std), and training accuracy on the un-augmented training
images beside test accuracy (the train/test gap). Only what the runs recorded; a method or seed missing is left out
and its count shown.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path


def mean_std(values: list[float], sign: str = "") -> str:
    if not values:
        return "—"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{sign}.2f} ± {std:.2f}"


def signed(values: list[float]) -> str:
    return ", ".join(f"{v:+.2f}" for v in values)


def recipe_tables(folder: Path, accuracy: dict) -> list[str]:
    rows = list(csv.DictReader((folder / "results.csv").open()))
    networks = list(dict.fromkeys(r["network"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    test = defaultdict(dict)  # (method, network) -> {seed: acc}
    for r in rows:
        test[r["method"], r["network"]][int(r["seed"])] = float(r["test_acc"])
    out = [f"### {folder.name} recipe", "",
           "| method | seeds | " + " | ".join(f"{n} test" for n in networks) + " | "
           + " | ".join(f"{n} − IL, per seed (mean ± std)" for n in networks) + " |",
           "|---|---|" + "---|" * (2 * len(networks))]
    for m in methods:
        seeds = sorted(test[m, networks[0]])
        cells = [mean_std(list(test[m, n].values())) for n in networks]
        for n in networks:
            diffs = [test[m, n][s] - test["il", n][s] for s in seeds if s in test["il", n]]
            cells.append("—" if m == "il" or not diffs else f"{signed(diffs)} ({mean_std(diffs, '+')})")
        out.append(f"| {m.upper()} | {', '.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    # this folder's runs, also where runs/METHOD/seedN links to a run of another folder (one IL for several grids)
    measured = {str(Path(k).resolve()): v for k, v in accuracy.items()}
    runs = {key: measured[key] for key in {str((folder / "runs" / r["method"] / f"seed{r['seed']}").resolve())
                                           for r in rows} if key in measured}
    if runs:
        out += ["", "Un-augmented training images against test images, last epoch's weights (EMA's where kept), "
                "mean over the seeds:", "",
                "| method | weights | " + " | ".join(f"{n} train / test (gap)" for n in networks) + " |",
                "|---|---|" + "---|" * len(networks)]
        for m in methods:
            for kind in ("last", "ema"):
                per_net = []
                for n in networks:
                    got = [r["networks"][n][kind] for r in runs.values() if r["method"] == m and kind in r["networks"][n]]
                    if not got:
                        break
                    tr = statistics.mean(g["train_acc"] for g in got)
                    te = statistics.mean(g["test_acc"] for g in got)
                    per_net.append(f"{tr:.2f} / {te:.2f} ({tr - te:+.2f}, {len(got)} seeds)")
                if len(per_net) == len(networks):
                    out.append(f"| {m.upper()} | {kind} | " + " | ".join(per_net) + " |")
    return out + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    accuracy_file = args.out / "train_accuracy.json"
    accuracy = json.loads(accuracy_file.read_text()) if accuracy_file.exists() else {}
    lines = []
    for folder in sorted((p.parent for p in args.out.glob("*/results.csv")), key=lambda f: (f.name != "paper", f.name)):
        lines += recipe_tables(folder, accuracy)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
