"""Where should the MKB go? The site study of docs/results.md section 5 (issue 34), run through `clcli compare`.

For one pair of networks, IL and CL at each MKB configuration, several seeds each, in section 5's regime: the first
10,000 CIFAR-10 training images, all 10,000 test images, batch 128, 40 epochs, the paper recipe (SGD lr 0.1 Nesterov,
wd 5e-4, cosine, pad-4 crop + flip), ImageNet stems at 32 px.

    python scripts/site_study.py run DATA OUT resnet10t regnetx_002 8x8 4x4+2x2 all --seeds 0,1
    python scripts/site_study.py table OUT            # the tables of every pair under OUT (markdown)
    python scripts/train_accuracy.py OUT/PAIR/* --out OUT/train_accuracy.json   # then: table OUT --train-accuracy ...

A configuration is a set of map sizes joined by '+' (each size is the probe's best equal-size site of that size for
the pair: `8x8`, `4x4+2x2`), `all` (one MKB at every size where both networks have an equal-size site of at least
2x2), `planned` (whatever `clcli train` plans with no site given: cl.sites empty, cl.mkbs 1) or `mkbsK` (the
probe's K best sites). Every configuration is resolved to the probe's site numbers at this commit, and the run folder
keeps the plan.json it trained (the sites it used), so a reader checks which taps each number is.

OUT/PAIR/il/runs/il/seedN holds the IL runs; OUT/PAIR/CONFIG/ is one `clcli compare --out` folder per configuration,
its runs/il a link to the IL runs (IL is trained once per seed, before any CL run of that seed). Runs go JOBS at a
time (one thread each with --threads 1: the CPU setting; on a GPU use --jobs 1 --threads 0). Re-running the same
command resumes: finished runs are reused, an interrupted one is resumed from its last checkpoint. Instances side by
side take disjoint seeds: a `compare --methods cl` trains its seed's linked IL run when it is missing, and a second
process on the same run is refused (the run lock).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CLCLI = [sys.executable, "-m", "clcli"]
PAPER = ["--set", "train.lr=0.1"]  # the quickstart recipe is the paper's optimiser (SGD Nesterov, wd 5e-4, cosine)


def common(args, a: str, b: str) -> list[str]:
    opts = ["--recipe", "quickstart", "--no-progress", "--data", args.data, "--epochs", str(args.epochs),
            "--set", f"models=[{a}, {b}]", "--set", f"data.train_limit={args.train_limit}",
            "--set", f"train.batch_size={args.batch_size}", *PAPER]
    if args.threads:
        opts += ["--set", f"train.threads={args.threads}"]
    return opts


def probe_candidates(a: str, b: str, input_size: int) -> list[dict]:
    out = subprocess.run([*CLCLI, "probe", a, b, "--input-size", str(input_size), "--json"], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)["candidates"]


def equal_sizes(candidates: list[dict]) -> dict[str, int]:
    """Each map size with an equal-size site of at least 2x2 -> the number of its best such site."""
    best: dict[str, int] = {}
    for number, site in enumerate(candidates, 1):
        h, w = site["size"]
        if site["pairing"] == "equal" and min(h, w) >= 2:
            best.setdefault(f"{h}x{w}", number)
    return best


def resolve(config: str, a: str, b: str, input_size: int) -> list[int]:
    """The probe's site numbers for a configuration ([] for `planned`: the plan `clcli train` makes itself)."""
    if config == "planned":
        return []
    candidates = probe_candidates(a, b, input_size)
    sizes = equal_sizes(candidates)
    if config.startswith("mkbs"):
        plan = json.loads(subprocess.run([*CLCLI, "probe", a, b, "--input-size", str(input_size), "--mkbs",
                                          config[4:], "--json"], check=True, capture_output=True, text=True).stdout)
        wanted = [[t["node"] for t in s["taps"]] for s in plan["sites"]]
        return [n for n, s in enumerate(candidates, 1) if [t["node"] for t in s["taps"]] in wanted]
    if config == "all":
        return sorted(sizes.values())
    missing = [s for s in config.split("+") if s not in sizes]
    if missing:
        sys.exit(f"{a} + {b} at {input_size} px has no equal-size site of {missing[0]}; it has {', '.join(sizes)}")
    return sorted(sizes[s] for s in config.split("+"))


def compare(args, a: str, b: str, folder: Path, method: str, seeds: list[int], sites: list[int] | None) -> None:
    """One `clcli compare` (one seed, or every seed for the table), its output in folder/seedN.log."""
    cmd = [*CLCLI, "compare", *common(args, a, b), "--methods", method, "--seeds", str(len(seeds)),
           "--set", f"train.seed={seeds[0]}", "--out", str(folder)]
    if sites is not None:
        cmd += ["--set", f"cl.sites=[{', '.join(map(str, sites))}]"]
    log = folder / (f"seed{seeds[0]}.log" if len(seeds) == 1 else "table.log")
    with log.open("a") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    print(f"{folder.name} {method} seeds {','.join(map(str, seeds))}: exit {done.returncode}", flush=True)


def run(args) -> None:
    a, b = args.models
    pair = Path(args.out) / f"{a}+{b}"
    seeds = [int(s) for s in args.seeds.split(",")]
    il = pair / "il"
    il.mkdir(parents=True, exist_ok=True)
    configs = {c: resolve(c, a, b, 32) for c in args.configs}
    for config, sites in configs.items():
        folder = pair / config
        (folder / "runs").mkdir(parents=True, exist_ok=True)
        link = folder / "runs" / "il"
        if not link.exists():
            link.symlink_to(os.path.relpath(il / "runs" / "il", link.parent), target_is_directory=True)
        print(f"{config}: cl.sites={sites}", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:  # IL first: every CL run of a seed reads its IL run
        list(pool.map(lambda s: compare(args, a, b, il, "il", [s], None), seeds))
        jobs = [(config, s) for config in configs for s in seeds]
        list(pool.map(lambda job: compare(args, a, b, pair / job[0], "cl", [job[1]], configs[job[0]]), jobs))
    for config, sites in configs.items():  # every seed already trained: this only writes table.md, results.csv
        compare(args, a, b, pair / config, "cl", seeds, sites)


def table(args) -> None:
    """Per pair: IL and each configuration, test accuracy mean ± std, each seed's difference to IL, the sites used,
    and with --train-accuracy (scripts/train_accuracy.py's file) the mean train / test accuracy and their gap."""
    fits = {}
    if args.train_accuracy:  # one entry per run: relative keys are relative to the file's folder, links resolved
        path = Path(args.train_accuracy)
        fits = {str((path.parent / k).resolve()): v for k, v in json.loads(path.read_text()).items()}
    for pair in sorted(p for p in Path(args.out).iterdir() if (p / "il").is_dir()):
        names = pair.name.split("+")
        il = _accuracies(pair / "il" / "runs" / "il")
        print(f"\n### {' + '.join(names)}\n")
        print("| config | sites | seeds | " + " | ".join(f"{n} test" for n in names) + " | "
              + " | ".join(f"{n} − IL per seed (mean ± std)" for n in names)
              + (" | train / test (gap) |" if fits else " |"))
        print("|" + "---|" * (3 + 2 * len(names) + bool(fits)))
        print(f"| IL | — | {','.join(map(str, il))} | "
              + " | ".join(_mean_std([il[s][i] for s in il]) for i in range(len(names))) + " | — | — |"
              + (f" {_fit(fits, pair / 'il' / 'runs' / 'il', names)} |" if fits else ""))
        for folder in sorted(p for p in pair.iterdir() if p.name != "il" and (p / "runs" / "cl").is_dir()):
            cl = _accuracies(folder / "runs" / "cl")
            if not cl:
                continue
            diffs = [[cl[s][i] - il[s][i] for s in cl if s in il] for i in range(len(names))]
            print(f"| {folder.name} | {_sites(folder / 'runs' / 'cl')} | {','.join(map(str, cl))} | "
                  + " | ".join(_mean_std([cl[s][i] for s in cl]) for i in range(len(names))) + " | "
                  + " | ".join(", ".join(f"{d:+.2f}" for d in ds) + f" ({_mean_std(ds, '+')})" for ds in diffs)
                  + (f" | {_fit(fits, folder / 'runs' / 'cl', names)} |" if fits else " |"))


def _fit(fits: dict, runs: Path, names: list[str]) -> str:
    """Mean training accuracy (un-augmented training images) / test accuracy (gap) per network over the measured
    seeds: 'resnet10t 98.5 / 75.4 (+23.1); ...'."""
    measured = [fits[k] for k in fits if Path(k).parent == runs.resolve()]
    if not measured:
        return "—"
    cells = []
    for n in names:
        train = statistics.mean(m["networks"][n]["last"]["train_acc"] for m in measured)
        test = statistics.mean(m["networks"][n]["last"]["test_acc"] for m in measured)
        cells.append(f"{train:.1f} / {test:.1f} ({train - test:+.1f})")
    return "; ".join(cells) + f" ({len(measured)} seeds)"


def _accuracies(runs: Path) -> dict[int, list[float]]:
    """seed -> final test accuracy per network, of the finished runs under runs/seedN."""
    out = {}
    for seed_dir in sorted(runs.glob("seed*"), key=lambda p: int(p.name[4:])):
        info = json.loads((seed_dir / "run.json").read_text()) if (seed_dir / "run.json").is_file() else {}
        if info.get("status") == "finished":
            out[int(seed_dir.name[4:])] = [float(v) for v in info["test_acc"].values()]
    return out


def _sites(runs: Path) -> str:
    """The taps of the first finished run's plan: 'layer2/s2 4x4 + layer3/s3 2x2'."""
    for plan_file in sorted(runs.glob("seed*/plan.json")):
        plan = json.loads(plan_file.read_text())
        return " + ".join("/".join(t["module"] for t in s["taps"]) + f" {s['size'][0]}x{s['size'][1]}"
                          for s in plan["sites"])
    return "?"


def _mean_std(values: list[float], sign: str = "") -> str:
    if not values:
        return "—"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{sign}.2f} ± {std:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train (or resume) IL and every configuration of one pair")
    p.add_argument("data", help="the CIFAR-10 folder (../shared/data/cifar10) or a Hub name")
    p.add_argument("out")
    p.add_argument("models", nargs=2)
    p.add_argument("configs", nargs="+", help="8x8, 4x4+2x2, all, planned, mkbs2, ...")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--train-limit", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--jobs", type=int, default=2, help="runs side by side")
    p.add_argument("--threads", type=int, default=1, help="threads per run (0: the recipe's default)")
    t = sub.add_parser("table", help="print the tables of every pair under OUT")
    t.add_argument("out")
    t.add_argument("--train-accuracy", help="scripts/train_accuracy.py's file for these runs (the train/test gap)")
    args = parser.parse_args()
    run(args) if args.command == "run" else table(args)


if __name__ == "__main__":
    main()
