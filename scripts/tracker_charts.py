"""The pictures of docs/cli.md's tracking section: what each tracker holds for one run, read back through the
tracker's own reader (TensorBoard's EventAccumulator, W&B's `wandb leet inspect --json` of its offline files,
MLflow's client on the local store) and drawn the same way: each network's training loss and test accuracy against
the step.

    python scripts/tracker_charts.py runs/quickstart/cl --store mlruns --out docs/images
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def tensorboard(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def wandb(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list] = {}
    for session in sorted((run_dir / "wandb").glob("offline-run-*")):
        out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(session)],
                             capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            record = json.loads(line)
            if record["type"] == "history":
                item = record["history"]["item"]
                for key, value in item.items():
                    if not key.startswith("_") and key != "step":
                        series.setdefault(key, []).append((item["step"], value))
    return series


def mlflow(run_dir: Path, store: Path) -> dict[str, list[tuple[int, float]]]:
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    run_id = json.loads((run_dir / "run.json").read_text())["tracking"]["mlflow"]["run_id"]
    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            for key in client.get_run(run_id).data.metrics}


def draw(series: dict, networks: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss, acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    for network in networks:
        for ax, key in ((loss, "cls"), (acc, "test_acc")):
            points = sorted(series.get(f"{network}/{key}", []))
            if points:
                ax.plot(*zip(*points), marker="o", markersize=2, label=f"{network}/{key}")
    loss.set_title("training loss (classification)", fontsize=9, loc="left")
    acc.set_title("test accuracy (%)", fontsize=9, loc="left")
    for ax in (loss, acc):
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, x=0.01, ha="left", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--store", type=Path, default=Path("mlruns"))
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    args = parser.parse_args()
    info = json.loads((args.run / "run.json").read_text())
    from clcli.models import network_labels

    networks = network_labels(info["models"])
    name = f"{args.run.parent.name}/{args.run.name} ({info['method']})"
    for tracker, series, reader in (
            ("tensorboard", tensorboard(args.run), "TensorBoard's EventAccumulator on tb/"),
            ("wandb", wandb(args.run), "W&B's `wandb leet inspect --json` on the offline run"),
            ("mlflow", mlflow(args.run, args.store), "MLflow's client on the local mlruns/ store")):
        path = args.out / f"tracking-{tracker}.png"
        draw(series, networks, f"{name}, read back with {reader}", path)
        print(f"{path}: {sum(len(v) for v in series.values())} logged values, {len(series)} series")


if __name__ == "__main__":
    main()
