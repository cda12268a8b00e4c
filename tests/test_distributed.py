"""torchrun on the CPU (gloo, 2 processes): DDP and per-network placement compute what one process computes.

Each test starts `python -m torch.distributed.run --nproc-per-node 2 -m clcli train ...` as a subprocess and compares
rank 0's checkpoint with a run in this process on the same recipe. Tolerance: rtol 1e-4, atol 1e-5 on every trained
parameter (the processes sum gradients in another order than one process does; in practice they agree to the bit).
BatchNorm running statistics are compared where both runs update them the same way (see each test). Every method
trains two steps under each placement it allows (`test_every_method_...`, about a minute on 2 busy cores).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from clcli import recipes
from clcli import train as train_lib
from _helpers import TINY

# 64 images, global batch 32: 2 steps an epoch, 4 in all.
SETS = ["data.train_limit=64", "data.test_limit=32", "train.batch_size=32", "methods=[cl]", "train.threads=1",
        "train.epochs=2", f"models=[{', '.join(TINY)}]"]


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def torchrun(args, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "clcli",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def train_args(out, *sets):
    return ["train", "--recipe", "quickstart", "--out", str(out), "--no-progress",
            *[x for s in (*SETS, *sets) for x in ("--set", s)]]


def one_process(out, *sets):
    """Train in this process; returns the checkpoint's method state (of a single-method run)."""
    train_lib.train(recipes.load("quickstart", [*SETS, *sets]), out, show_progress=False)
    return torch.load(out / "checkpoint.pt", weights_only=True)["method"] if (out / "checkpoint.pt").is_file() \
        else None


def assert_same_training(reference, distributed, skip):
    assert reference.keys() == distributed.keys()
    compared = 0
    for key, value in reference.items():
        if skip(key):
            continue
        torch.testing.assert_close(distributed[key], value, rtol=1e-4, atol=1e-5, msg=key)
        compared += 1
    assert compared > 50  # the networks, their MKB halves and the verifier, not a handful of keys


def bn_statistics(key):
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def test_ddp_on_two_processes_matches_one_process_with_the_same_global_batch(tmp_path):
    # Each process takes half of every global batch of 32 (same order, same augmentation) and keeps per-half
    # BatchNorm statistics: exactly one process with the batch cut into 2 micro-batches (train.accumulate=2).
    run = torchrun(train_args(tmp_path / "ddp"))
    assert run.returncode == 0, run.stderr[-3000:]
    reference = one_process(tmp_path / "one", "train.accumulate=2")
    ddp = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)["method"]
    # Running statistics: rank 0's (DDP broadcasts them from rank 0) saw one half per step, one process both.
    assert_same_training(reference, ddp, skip=bn_statistics)
    # The full batch in one process is a different computation (BatchNorm over 32, not 2 x 16): the comparison
    # above can tell sharded from unsharded data.
    full = one_process(tmp_path / "full")
    assert any(not torch.allclose(full[k], ddp[k], rtol=1e-4, atol=1e-5) for k in full if not bn_statistics(k))
    lines = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines if x["type"] == "epoch"] == [0, 1]  # rank 0 alone writes
    assert json.loads((tmp_path / "ddp" / "run.json").read_text())["status"] == "finished"


# SGD keeps one state tensor per parameter; AdamW keeps three (two moments and a step) that rank 0's checkpoint must
# hold for the other process's network too, and the EMA copy of that network must travel the same way.
@pytest.mark.parametrize("optimiser", [[], ["train.opt=adamw", "train.lr=0.002", "train.ema_decay=0.5"]],
                         ids=["sgd", "adamw-ema"])
def test_per_network_placement_killed_and_resumed_matches_single_process_cl(tmp_path, optimiser):
    out = tmp_path / "per-network"
    # Both processes die in the middle of epoch 2 (global step 3); the checkpoint of epoch 1 holds both networks.
    dead = torchrun(train_args(out, "train.placement=per-network", *optimiser),
                    env={"CLCLI_FAULT_KILL_AT_STEP": "3"})
    assert dead.returncode != 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    resumed = torchrun(["train", "--resume", str(out), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = one_process(tmp_path / "one", *optimiser)
    per_network = torch.load(out / "checkpoint.pt", weights_only=True)["method"]
    # The shared space transfer's BatchNorm statistics: one process updates them with each network's codes in
    # turn, per-network placement averages the processes' at the end of each epoch. Everything else is the same.
    assert_same_training(reference, per_network, skip=lambda k: ".transfer." in k and bn_statistics(k))
    if optimiser:
        ema_one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)["ema"]
        ema_two = torch.load(out / "checkpoint.pt", weights_only=True)["ema"]
        for a, b in zip(ema_one, ema_two):
            for k in a:
                if not bn_statistics(k):
                    torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


# Every method, two steps (64 images, global batch 32, one epoch), under each placement it allows: kd and fitnets learn
# from an IL teacher trained first in this process. Each is checked against one process computing the same thing.
EVERY_METHOD = ["il", "cl", "kd", "fitnets", "dml", "wel", "mkb-solo"]
PER_NETWORK = ["il", "cl", "mkb-solo"]  # the methods whose networks can each run in their own process


def test_every_method_trains_under_torchrun_with_each_placement_it_allows(tmp_path):
    from clcli import methods

    assert sorted(EVERY_METHOD) == sorted(methods.METHODS)  # a new method joins this test
    assert PER_NETWORK == [m for m in EVERY_METHOD if methods.get(m).per_network]
    teacher = tmp_path / "teacher"
    one_process(teacher, "methods=[il]", "train.epochs=1")
    sets = ["train.epochs=1", f"kd.teacher={teacher}"]

    def checkpoint(folder, method):
        return torch.load(folder / method / "checkpoint.pt", weights_only=True)["method"]

    replicated = torchrun(train_args(tmp_path / "ddp", *sets, f"methods=[{', '.join(EVERY_METHOD)}]"))
    assert replicated.returncode == 0, replicated.stderr[-3000:]
    one_process(tmp_path / "one-ddp", *sets, f"methods=[{', '.join(EVERY_METHOD)}]", "train.accumulate=2")
    for method in EVERY_METHOD:
        assert_same_training(checkpoint(tmp_path / "one-ddp", method), checkpoint(tmp_path / "ddp", method),
                             skip=bn_statistics)

    per_network = torchrun(train_args(tmp_path / "per-network", *sets, f"methods=[{', '.join(PER_NETWORK)}]",
                                      "train.placement=per-network"))
    assert per_network.returncode == 0, per_network.stderr[-3000:]
    one_process(tmp_path / "one", *sets, f"methods=[{', '.join(PER_NETWORK)}]")
    for method in PER_NETWORK:
        # Only CL's space transfers are shared (their statistics are averaged over the processes); mkb-solo's are
        # each one network's, updated by its process alone: everything else, statistics included, is the same.
        shared = methods.get(method).uses_mkb and methods.get(method).shared_transfer
        assert_same_training(checkpoint(tmp_path / "one", method), checkpoint(tmp_path / "per-network", method),
                             skip=lambda k: shared and ".transfer." in k and bn_statistics(k))


def test_a_slice_of_a_batch_is_augmented_as_inside_the_whole_batch():
    from clcli.data import BatchAugment

    images = torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8)
    augment = BatchAugment("crop_flip", padding=4)
    whole = augment(images, torch.Generator().manual_seed(3))
    for k in range(4):
        part = augment(images[2 * k:2 * k + 2], torch.Generator().manual_seed(3), (k, 4))
        assert torch.equal(part, whole[2 * k:2 * k + 2])
    assert not torch.equal(whole, images)
