"""The run folder: what a training run writes, and how a run is found and resumed.

    <run>/recipe.yaml      the resolved recipe
    <run>/plan.json        the probe plan (sites, MKB shapes)
    <run>/run.json         method, models, classes, normalisation, status and final accuracies
    <run>/metrics.jsonl    one line per logged step and per epoch
    <run>/checkpoint.pt    the last completed epoch (tensors and plain containers only: weights_only loads it)
"""
from __future__ import annotations

import json
from pathlib import Path

from clcli import _io
from clcli.errors import ClcliError, one_line

CHECKPOINT = "checkpoint.pt"
RUN_FORMAT = 1


def prepare(run_dir: Path, *, resume: bool, force: bool) -> None:
    if resume:
        if not (run_dir / "run.json").is_file():
            raise ClcliError(f"{run_dir} is not a clcli run folder (no run.json) to resume")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        if not force:
            raise ClcliError(f"{run_dir} already exists; use --resume to continue it or --force to replace it")
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ClcliError(f"missing {path}") from None
    except json.JSONDecodeError as e:
        raise ClcliError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


def save_checkpoint(path: Path, state: dict) -> None:
    import torch

    with _io.atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    import torch

    if not path.is_file():
        raise ClcliError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user-facing "corrupt" error
        raise ClcliError(f"{path} is not a readable clcli checkpoint ({one_line(e)})") from None


class MetricsLog:
    """metrics.jsonl, appended line by line (flushed), truncated to whole epochs on resume."""

    def __init__(self, path: Path, keep_before_epoch: int | None = None):
        self.path = path
        if keep_before_epoch is not None and path.exists():
            kept = [ln for ln in path.read_text().splitlines()
                    if ln.strip() and _epoch_of(ln) < keep_before_epoch]
            _io.write_text(path, "".join(k + "\n" for k in kept))
        self._file = open(path, "a")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _epoch_of(line: str) -> int:
    try:
        return int(json.loads(line).get("epoch", 1 << 30))
    except (json.JSONDecodeError, TypeError, ValueError):
        return 1 << 30


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def method_runs(run_dir: Path) -> list[Path]:
    """The run folder itself, or the per-method run folders inside it (`clcli train --method il,cl`)."""
    if (run_dir / "run.json").is_file():
        return [run_dir]
    subruns = sorted(p.parent for p in run_dir.glob("*/run.json"))
    if not subruns:
        raise ClcliError(f"{run_dir} is not a clcli run folder (no run.json)")
    return subruns


def latest_run(root: Path = Path("runs")) -> Path:
    runs = [p.parent for p in root.glob("**/run.json")] if root.is_dir() else []
    if not runs:
        raise ClcliError(f"no runs under {root}/; give the run folder")
    return max(runs, key=lambda p: (p / "run.json").stat().st_mtime)
