"""Print a markdown table of final test accuracies from run folders (run.json), plus per-epoch curves.

    python scripts/summarize_runs.py runs/cifar10-cpu
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def main(root: str) -> None:
    rows = []
    for info_path in sorted(Path(root).glob("**/run.json")):
        info = json.loads(info_path.read_text())
        run = info_path.parent
        label = str(run.relative_to(root))
        epochs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"epoch"' in x]
        epochs = [e for e in epochs if e.get("type") == "epoch"]
        rows.append((label, info.get("status"), info["method"], info.get("test_acc") or (epochs[-1]["test_acc"] if
                                                                                       epochs else {}), epochs))
    names = list(rows[0][3]) if rows else []
    print("| run | method | status | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for label, status, method, acc, _ in rows:
        print(f"| {label} | {method} | {status} | " + " | ".join(f"{acc.get(n, float('nan')):.2f}" for n in names)
              + " |")
    by_method: dict[str, list[dict]] = {}
    for label, status, method, acc, _ in rows:
        if status == "finished":
            key = method + (" (add)" if "add" in label else "")
            by_method.setdefault(key, []).append(acc)
    print("\n| method | runs | " + " | ".join(f"{n} mean ± std" for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for method, accs in by_method.items():
        cells = []
        for n in names:
            v = [a[n] for a in accs]
            cells.append(f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}")
        print(f"| {method} | {len(accs)} | " + " | ".join(cells) + " |")
    print("\nper-epoch test accuracy:")
    for label, _, _, _, epochs in rows:
        print(label, [" / ".join(f"{v:.1f}" for v in e["test_acc"].values()) for e in epochs])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs")
