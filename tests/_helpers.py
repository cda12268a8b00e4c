"""Small real settings shared by the training and export tests: two tiny timm networks on a slice of the
shipped CIFAR-10 subset."""
from clcli import recipes
from clcli.data import QUICKSTART_DIR

TINY = ["test_resnet", "test_efficientnet"]


def tiny_recipe(models=None, methods=("cl",), epochs=2, **cl):
    return recipes.from_dict({
        "name": "tiny",
        "models": list(models or TINY),
        "methods": list(methods),
        "input_size": 32,
        "stem": "small",
        "data": {"source": str(QUICKSTART_DIR), "train_limit": 256, "test_limit": 200, "augment": "crop_flip"},
        "cl": dict(cl),
        "train": {"epochs": epochs, "batch_size": 32, "lr": 0.05, "schedule": "cosine", "log_every": 4,
                  "threads": 2},
    })


def tiny_args(out, epochs=2):
    return ["train", "--recipe", "quickstart", "--models", *TINY, "--epochs", str(epochs), "--out", str(out),
            "--no-progress", "--set", "data.train_limit=256", "--set", "data.test_limit=200",
            "--set", "train.batch_size=32", "--set", "methods=[cl]", "--set", "train.threads=2"]


def cli(args, env=None):
    """`python -m clcli ARGS` in a subprocess: the real exit code and signals (SIGKILL of a fault injection)."""
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "clcli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def straight_and_killed(args, straight, killed, kill_at_step: int, killed_epochs: int = 1):
    """Train `args(folder)` once straight through and once killed (SIGKILL) at global step `kill_at_step` then
    resumed; returns both final checkpoints (for a bit-exact comparison)."""
    import torch

    done = cli(args(straight))
    assert done.returncode == 0, done.stderr
    dead = cli(args(killed), env={"CLCLI_FAULT_KILL_AT_STEP": str(kill_at_step)})
    assert dead.returncode == -9
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["epoch"] == killed_epochs
    resumed = cli(["train", "--resume", str(killed), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    return (torch.load(straight / "checkpoint.pt", weights_only=True),
            torch.load(killed / "checkpoint.pt", weights_only=True))
