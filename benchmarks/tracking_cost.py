"""What each experiment tracker costs per logged step, in the training process.

Opens each tracker (TensorBoard, W&B offline, MLflow with a local file store) for a throw-away run folder, as
`clcli train --log` does, and times `Trackers.log` on a CL step record of two networks (cls, metric, verification
and train_acc per network, lr, images_per_s: 10 scalars) for --steps steps; the median and the 90th percentile of
the per-record wall time, the time to open the tracker (the first time with its import) and to close it. In
alternating rounds, so that a busy machine weighs on each tracker alike.

    python benchmarks/tracking_cost.py [--steps 200] [--rounds 3] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

LABELS = ["resnet18", "mobilenetv3_small_050"]
TRACKERS = ["tensorboard", "wandb", "mlflow"]


def _record(step: int) -> dict:
    parts = {f"{i}/{p}": 1.0 / (step + i + 1) for i in range(len(LABELS)) for p in ("cls", "metric", "verification")}
    accs = {f"{i}/train_acc": 50.0 + i for i in range(len(LABELS))}
    return {"type": "step", "epoch": 0, "step": step, "lr": 0.1, "images_per_s": 1234.5, **parts, **accs}


def _one(name: str, folder: Path, steps: int) -> dict:
    from clcli import tracking

    ctx = tracking.Context(run_dir=folder, name=f"bench-{name}", labels=LABELS, hparams={"train.lr": 0.1},
                           texts={"plan": "bench"})
    started = time.perf_counter()
    trackers = tracking.start([name], ctx)
    opened = time.perf_counter() - started
    if not trackers:
        raise SystemExit(f"{name} did not start")
    times = []
    for step in range(1, steps + 1):
        record = _record(step)
        t = time.perf_counter()
        trackers.log(record)
        times.append(time.perf_counter() - t)
    started = time.perf_counter()
    trackers.close("finished")
    closed = time.perf_counter() - started
    return {"open_s": opened, "close_s": closed, "per_step": times}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    os.environ["WANDB_MODE"] = "offline"
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = (Path(tmp) / "mlruns").as_uri()
        samples = {name: {"per_step": [], "open_s": [], "close_s": []} for name in TRACKERS}
        for r in range(args.rounds):
            for name in TRACKERS:
                result = _one(name, Path(tmp) / f"{name}-{r}", args.steps)
                for key in samples[name]:
                    samples[name][key] += result[key] if key == "per_step" else [result[key]]
    out = {"steps": args.steps, "rounds": args.rounds, "scalars_per_step": len(_record(1)) - 3,
           "trackers": {name: {"median_ms": 1e3 * statistics.median(s["per_step"]),
                               "p90_ms": 1e3 * statistics.quantiles(s["per_step"], n=10)[-1],
                               "first_open_s": s["open_s"][0], "open_s": statistics.median(s["open_s"]),
                               "close_s": statistics.median(s["close_s"])}
                        for name, s in samples.items()}}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{out['scalars_per_step']} scalars a step, {args.steps} steps x {args.rounds} rounds")
        for name, t in out["trackers"].items():
            print(f"{name:12s} {t['median_ms']:7.3f} ms median, {t['p90_ms']:7.3f} ms p90 per logged step; "
                  f"first open (import included) {t['first_open_s']:.2f} s, open {t['open_s']:.2f} s, "
                  f"close {t['close_s']:.2f} s")
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
