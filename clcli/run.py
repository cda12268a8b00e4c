"""The run folder: what a training run writes, and the one way to read it back (`Run`).

    <run>/recipe.yaml      the resolved recipe
    <run>/plan.json        the probe plan (sites, MKB shapes) and, under "fuse", how the MKB halves fuse
    <run>/run.json         method, models, classes, normalisation, status and final accuracies
    <run>/metrics.jsonl    one line per logged step and per epoch
    <run>/checkpoint.pt    the last completed epoch (tensors and plain containers only: weights_only loads it)
    <run>/.clcli.lock      only while a process trains the run (`held`)
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from clcli import files, models
from clcli.errors import ClcliError, one_line

CHECKPOINT = "checkpoint.pt"
FOLDS_FILE = "folds.json"  # a fold protocol folder (clcli.train's fold protocol writes it)
RUN_FORMAT = 1
COHORT_PREFIX = "cohort."  # the cohort's keys in a checkpoint's method state
WEIGHTS = ("last", "ema", "best")  # which weights of a run `cohort()` and `clcli export` take
# What resuming and exporting read from run.json, and the kind of value each holds.
_INFO_KEYS = {"method": "text", "models": "a list of model names", "class_names": "a list of class names",
              "mean": "a list of numbers", "std": "a list of numbers", "input_size": "a list of numbers"}


def _info_value_ok(key: str, value) -> bool:
    if key == "method":
        return isinstance(value, str)
    if not isinstance(value, list) or not value:
        return False
    if key in ("models", "class_names"):
        return all(isinstance(v, str) for v in value)
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def _read_info(path: Path) -> dict:
    """The run.json of run folder `path`, with what resuming and exporting read from it checked; one line if not."""
    if not (path / "run.json").is_file():
        raise ClcliError(f"{path} is not a clcli run folder (no run.json)")
    info = files.read_json(path / "run.json", "run file")
    missing = [k for k in _INFO_KEYS if k not in info]
    if missing:
        raise ClcliError(f"{path / 'run.json'} is not a clcli run.json (no {', '.join(missing)})")
    wrong = next((k for k in _INFO_KEYS if not _info_value_ok(k, info[k])), None)
    if wrong:
        raise ClcliError(f"{path / 'run.json'} is damaged: '{wrong}' must be {_INFO_KEYS[wrong]}, it is "
                         f"{json.dumps(info[wrong])[:60]}")
    return info


class Run:
    """One run folder, read: `info` (run.json), `recipe`, `plan`, the last checkpoint (`state`), the networks'
    weights (`network_state`, `weights_of`, `best_epochs`) and the cohort rebuilt from them (`cohort`). Files are
    read when first asked for; the checkpoint by `_Checkpoint`, the cohort by `_rebuilt_cohort`."""

    def __init__(self, path: Path, info: dict):
        self.path, self.info = path, info
        self._checkpoint = _Checkpoint(path / CHECKPOINT)
        self._recipe = self._plan = self._plan_dict = None

    @classmethod
    def open(cls, path: str | Path) -> "Run":
        return cls(Path(path), _read_info(Path(path)))

    @classmethod
    def children(cls, path: str | Path) -> list["Run"]:
        """The run folder itself, or the per-method run folders inside it (`clcli train --method il,cl`)."""
        path = Path(path)
        if (path / "run.json").is_file():
            return [cls.open(path)]
        subruns = sorted(p.parent for p in path.glob("*/run.json"))
        if not subruns:
            raise ClcliError(f"{path} is not a clcli run folder (no run.json)")
        return [cls.open(p) for p in subruns]

    @classmethod
    def pick(cls, path: str | Path) -> "Run":
        """The run a folder stands for: the folder's own run, or of its per-method runs the CL one (else the
        first); what `clcli export` exports."""
        runs = cls.children(path)
        return next((r for r in runs if r.path.name == "cl"), runs[0])

    @classmethod
    def latest(cls, root: str | Path = "runs") -> "Run":
        """The run under `root` whose checkpoint was written last (runs that stopped before their first checkpoint
        have nothing to export and are passed over)."""
        root = Path(root)
        runs = [p.parent for p in root.glob("**/run.json") if (p.parent / CHECKPOINT).is_file()] \
            if root.is_dir() else []
        if not runs:
            raise ClcliError(f"no run with a checkpoint under {root}/; give the run folder")
        return cls.open(max(runs, key=lambda p: (p / CHECKPOINT).stat().st_mtime))

    @property
    def method(self) -> str:
        return self.info["method"]

    @property
    def status(self) -> str | None:
        return self.info.get("status")

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def recipe(self):
        if self._recipe is None:
            self._recipe = read_recipe(self.path / "recipe.yaml")
        return self._recipe

    @property
    def plan(self):
        if self._plan is None:
            from clcli import probe

            self._plan = probe.Plan.from_dict(self._plan_file())
        return self._plan

    @property
    def fuse(self) -> str:
        """How the MKB halves fuse: recorded in plan.json (runs from before that: in the recipe)."""
        return self._plan_file().get("fuse", self.recipe.cl.fuse)

    def _plan_file(self) -> dict:
        if self._plan_dict is None:
            self._plan_dict = files.read_json(self.path / "plan.json", "plan file")
        return self._plan_dict

    @property
    def method_class(self):
        """The method this run was trained with (its traits: uses_mkb, shared_transfer)."""
        from clcli import methods

        if self.method not in methods.METHODS:
            raise ClcliError(f"{self.path} was trained with method '{self.method}', which this clcli does not know")
        return methods.METHODS[self.method]

    @property
    def with_mkb(self) -> bool:
        return self.method_class.uses_mkb

    def metrics(self) -> list[dict]:
        return read_metrics(self.path)

    def state(self, map_location="cpu") -> dict:
        """The last checkpoint: {"epoch", "method", "optimizer", "scheduler", ...}."""
        return self._checkpoint.state(map_location)

    def network_state(self, index: int) -> dict:
        return self._checkpoint.network_state(index)

    def weights_of(self, weights: str, labels: list[str]) -> list[dict]:
        return self._checkpoint.weights_of(weights, labels)

    def best_epochs(self) -> dict[str, int]:
        return self._checkpoint.best_epochs()

    def cohort(self, weights: str = "last"):
        """The cohort as the last checkpoint left it, in eval mode: each network's live weights (`last`), their
        moving average (`ema`, train.ema_decay) or its best epoch's on the validation split (`best`,
        train.keep_best)."""
        return _rebuilt_cohort(self, weights)


class _Checkpoint:
    """A run's checkpoint.pt (its last completed epoch), loaded when first asked for, and what it keeps of each
    network: its live weights, their moving average, its best epoch's."""

    def __init__(self, path: Path):
        self.path, self.run_dir = path, path.parent
        self._state = None

    def state(self, map_location="cpu") -> dict:
        if self._state is None:
            self._state = load_checkpoint(self.path, map_location=map_location)
        return self._state

    def network_state(self, index: int) -> dict:
        """Network `index`'s weights (with its MKB halves, if any) under the network's own keys."""
        prefix = f"{COHORT_PREFIX}networks.{index}."
        return {k[len(prefix):]: v for k, v in self.state()["method"].items() if k.startswith(prefix)}

    def weights_of(self, weights: str, labels: list[str]) -> list[dict]:
        """Each network's `ema` or `best` state dict; one line when the run kept none."""
        state = self.state()
        if weights == "ema":
            if "ema" not in state:
                raise ClcliError(f"{self.run_dir} kept no moving average of its weights (train it with "
                                 "train.ema_decay, e.g. --set train.ema_decay=0.999)")
            return state["ema"]
        if "best" not in state:
            raise ClcliError(f"{self.run_dir} kept no best-epoch weights (train it with --set train.keep_best=true)")
        return [state["best"]["networks"][label] for label in labels]

    def best_epochs(self) -> dict[str, int]:
        """{network: its best epoch (1-based)} of a train.keep_best run."""
        return {name: e + 1 for name, e in self.state().get("best", {}).get("epoch", {}).items()}


def _rebuilt_cohort(run: Run, weights: str):
    """`Run.cohort`: the cohort built from the run's plan and method, loaded from its checkpoint."""
    from clcli.cohort import build_cohort

    if weights not in WEIGHTS:
        raise ClcliError(f"unknown weights '{weights}' (choose from {', '.join(WEIGHTS)})")
    traits = run.method_class
    cohort = build_cohort(run.plan, num_classes=len(run.info["class_names"]), seed=run.recipe.train.seed,
                          with_mkb=traits.uses_mkb, fuse=run.fuse, shared_transfer=traits.shared_transfer)
    state = run.state()["method"]
    # a diverged run is not a model to use (nor a teacher)
    models.check_finite(state, f"the checkpoint {run.path / CHECKPOINT}")
    cohort.load_state_dict({k[len(COHORT_PREFIX):]: v for k, v in state.items() if k.startswith(COHORT_PREFIX)})
    if weights != "last":
        for net, state in zip(cohort.networks, run.weights_of(weights, cohort.labels)):
            models.check_finite(state, f"the {weights} weights in {run.path / CHECKPOINT}")
            net.load_state_dict(state)
    return cohort.eval()


def free_folder(name: str, root: str | Path = "runs") -> Path:
    """<root>/<name>, or <root>/<name>-2, -3, ... when taken: a default never replaces an earlier run."""
    base = Path(root) / name
    candidate, k = base, 1
    while candidate.exists():
        k += 1
        candidate = base.with_name(f"{base.name}-{k}")
    return candidate


def read_recipe(path: Path):
    """A recipe.yaml that clcli wrote (run folders, fold folders), validated; one-line errors."""
    from clcli import recipes

    return recipes.from_dict(files.read_yaml(path, "recipe"), str(path))


def holds_runs(path: Path) -> bool:
    """Whether `path` is what `clcli train` writes: a run folder (or the start of one: its recipe), one run folder
    per method, or a fold protocol folder."""
    from clcli import methods

    return (any((path / name).is_file() for name in ("run.json", "recipe.yaml", FOLDS_FILE))
            or any((path / m / "run.json").is_file() for m in methods.METHODS))


def prepare(run_dir: Path, *, resume: bool, force: bool) -> None:
    """An empty `run_dir` for a new run (`--out`, whatever the methods: two runs never share a folder); an existing
    non-empty one is refused unless `force`, which replaces only what clcli train wrote."""
    if resume:
        if not (run_dir / "run.json").is_file():
            raise ClcliError(f"{run_dir} is not a clcli run folder (no run.json) to resume")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        if not force:
            raise ClcliError(f"{run_dir} already exists; use --resume to continue it or --force to replace it")
        if not holds_runs(run_dir):
            raise ClcliError(f"{run_dir} holds files that are not a clcli run; --force replaces run folders only: "
                             "choose a new or empty --out")
        for lock in run_dir.rglob(LOCK):  # --force never removes a run that a process is training
            with held(lock.parent):
                pass
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


LOCK = ".clcli.lock"


@contextlib.contextmanager
def held(run_dir: Path):
    """Hold `run_dir` for this process while it trains: a second process that would train or resume the same run
    (a second `clcli compare` over the same runs, a second `--resume`) stops with one line instead of writing its
    checkpoints and metrics into this one's. An OS lock (flock), so a killed process holds nothing; the lock file
    goes when the run ends."""
    try:
        import fcntl
    except ImportError:  # no flock on this OS: train unguarded
        yield
        return
    path = run_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise ClcliError(f"{run_dir} is being trained by {holder}: wait for it to end, or train into another "
                             f"--out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()}".encode(), 0)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def discard_unstarted(run_dirs: list[Path], root: Path | None = None) -> list[Path]:
    """Remove the run folders among `run_dirs` that have no checkpoint (a run that stopped before its first one:
    nothing there can be resumed or exported), then `root` if that leaves it empty. Returns the folders removed."""
    import shutil

    removed = [d for d in run_dirs if d.is_dir() and not (d / CHECKPOINT).is_file()]
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
    if root is not None and root.is_dir() and not any(root.iterdir()):
        root.rmdir()
    return removed


def kept_checkpoint(run_dir: Path, epoch: int) -> str:
    """Which checkpoint a stopped run keeps, in words (`epoch`: the last completed one, 0 = none)."""
    if epoch:
        return f"the checkpoint of epoch {epoch} is kept in {run_dir / CHECKPOINT}"
    return f"no checkpoint was written in {run_dir}"


def save_checkpoint(path: Path, state: dict) -> None:
    """`state` written whole to `path`, or not at all (the previous checkpoint stays): a full disk is one line."""
    import torch

    with files.atomic_path(path, needed=_tensor_bytes(state)) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)  # through a Python file: a failed write is an OSError that names its cause


def _tensor_bytes(obj) -> int:
    """The bytes of the tensors in a nest of dicts, lists and tuples (about what torch.save writes)."""
    import torch

    if torch.is_tensor(obj):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


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
            kept = [ln for ln in files.read_text(path, "metrics log").splitlines()
                    if ln.strip() and _epoch_of(ln) < keep_before_epoch]
            files.write_text(path, "".join(k + "\n" for k in kept))
        self._file = open(path, "a")

    def write(self, record: dict) -> None:
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:
            raise files.write_error(self.path, e) from None

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:  # what was left to flush met the same full disk, which the failed write has reported
            pass


def _epoch_of(line: str) -> int:
    try:
        return int(json.loads(line).get("epoch", 1 << 30))
    except (json.JSONDecodeError, TypeError, ValueError):
        return 1 << 30


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of metrics.jsonl; a line that is not a JSON object (torn by a crash mid-write) is left out."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in files.read_text(path, "metrics log").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
