"""The CUDA path, on a GPU: bf16 autocast, channels_last and train.compile in a CL step and a training run, resume,
an export from a CUDA run loaded on the CPU, DDP over NCCL with one process.

Marked `cuda` and skipped without CUDA: `pytest -m cuda` on a GPU machine (scripts/device_run.sh runs them there).
tests/test_gpu_paths.py checks the same code paths on the CPU where they can run there.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import clcli
from clcli import export, probe, recipes
from clcli.methods import Batch, create
from clcli.run import Run
from clcli.train import build_cohort, mixed_precision, train

from _helpers import TINY, tiny_args, tiny_recipe

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pytest -m cuda there)")]

CUDA_SETS = {"device": "cuda", "amp": True, "channels_last": True}


def _cuda_recipe(epochs=1, **train_keys):
    recipe = tiny_recipe(epochs=epochs)
    for key, value in {**CUDA_SETS, **train_keys}.items():
        setattr(recipe.train, key, value)
    return recipe


def _cl_method(device, memory_format=torch.contiguous_format):
    plan = probe.plan(TINY, 32, stem="small")
    cohort = build_cohort(plan, num_classes=10, seed=0, with_mkb=True).to(device, memory_format=memory_format)
    return create("cl", cohort, recipes.from_dict({"models": TINY, "input_size": 32, "stem": "small"}))


def _batch(device, n=16, memory_format=torch.contiguous_format):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g).to(device, memory_format=memory_format)
    y = torch.randint(0, 10, (n,), generator=g).to(device)
    idx = torch.arange(n)
    return Batch([x, x], [y, y], [idx, idx], [x, x])


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory):
    """A CL run trained on CUDA with bf16 autocast, channels_last and train.compile (two timm networks)."""
    out = tmp_path_factory.mktemp("cuda") / "cl"
    summary = train(_cuda_recipe(compile=True), out, show_progress=False)
    return out, summary


def test_cl_step_on_cuda_runs_in_bf16_with_channels_last():
    device = torch.device("cuda")
    amp, dtype, scaler = mixed_precision(device, True)
    assert amp and dtype == torch.bfloat16 and scaler is None  # every GPU that clcli's device run uses has bf16
    method = _cl_method(device, torch.channels_last).train()
    batch = _batch(device, memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=dtype):
        out = method(batch)
    assert all(logits.dtype == torch.bfloat16 for logits in out["logits"])
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = [p.grad for p in method.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    conv = next(m for m in method.cohort.networks[0].modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_training_on_cuda_with_compile_and_channels_last_finishes(cuda_run):
    out, summary = cuda_run
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished"
    assert set(summary["cl"]["test_acc"]) == set(TINY)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [v for r in records if r["type"] == "step" for k, v in r.items() if k.endswith("/cls")]
    assert losses and all(v == v and abs(v) < 1e3 for v in losses)  # finite


def test_resume_on_cuda_ends_where_an_uninterrupted_run_ends(tmp_path):
    """Killed in the second epoch and resumed, on CUDA. cuDNN's backward kernels are not deterministic, so the
    weights are compared with a tolerance: rtol 1e-2, atol 1e-3 (on the CPU the same test asks for equality)."""
    cuda = ["--set", "train.device=cuda", "--set", "train.channels_last=true"]
    env = {**os.environ}

    def cli(args, extra=None):
        return subprocess.run([sys.executable, "-m", "clcli", *args], capture_output=True, text=True,
                              env={**env, **(extra or {})}, timeout=600)

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert (done := cli(tiny_args(straight) + cuda)).returncode == 0, done.stderr
    dead = cli(tiny_args(killed) + cuda, {"CLCLI_FAULT_KILL_AT_STEP": "11"})  # 8 steps an epoch
    assert dead.returncode == -9
    assert (resumed := cli(["train", "--resume", str(killed), "--no-progress"])).returncode == 0, resumed.stderr
    a = torch.load(straight / "checkpoint.pt", weights_only=True)["method"]
    b = torch.load(killed / "checkpoint.pt", weights_only=True)["method"]
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(b[key], a[key], rtol=1e-2, atol=1e-3, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key


def test_export_of_a_cuda_run_loads_on_the_cpu_and_agrees(cuda_run, tmp_path):
    """The exported network on the CPU against the same network on CUDA (float32; cuDNN may use TF32): relative
    L2 difference of the logits at most 1e-2; the test accuracy measured at export (CPU) within 1 point (2 of the
    200 test images) of what the CUDA run reported."""
    out, summary = cuda_run
    exported = export.export_run(out, tmp_path / "exp", measure=True)
    cohort = Run.pick(out).cohort()
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for name, net in zip(cohort.labels, cohort.networks):
        on_cpu = clcli.load(tmp_path / "exp" / f"{name}.safetensors", device="cpu")
        assert next(on_cpu.parameters()).device.type == "cpu"
        with torch.no_grad():
            reference = net.cuda().eval()(x.cuda()).float().cpu()
            logits = on_cpu(x)
        err = ((logits - reference).norm() / reference.norm()).item()
        assert err <= 1e-2, f"{name}: relative difference {err:.2e}"
    measured = {e["network"]: e["test_acc"] for e in exported["networks"]}
    for name, acc in summary["cl"]["test_acc"].items():
        assert abs(measured[name] - acc) <= 1.0, (name, measured[name], acc)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_nccl_available(), reason="needs NCCL")
def test_ddp_over_nccl_with_one_process_computes_the_plain_step():
    """clcli's DDP wrapping over a one-process NCCL group gives the gradients of the unwrapped CL step (the
    all-reduce of one process is the identity): rtol 1e-4, atol 1e-5."""
    import torch.distributed as dist

    from clcli.train import _dist

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        device = torch.device("cuda")
        plain, wrapped_method = _cl_method(device).train(), _cl_method(device).train()
        wrapped_method.load_state_dict(plain.state_dict())
        # `wrap` decides by the job's size: a Dist of two stands in for the larger job a one-process group lacks.
        wrapped = _dist.wrap(wrapped_method, _dist.Dist(rank=0, world=2), find_unused=False)
        assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
        for model in (plain, wrapped):
            model(_batch(device))["loss"].backward()
        compared = 0
        for (name, p), q in zip(plain.named_parameters(), wrapped_method.parameters()):
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
                compared += 1
        assert compared > 20
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("spec", ["rand-m9-n2-mstd0.5", "trivialaugment", "original"])
def test_auto_augment_runs_on_a_cuda_batch_with_a_cuda_generator(spec):
    from clcli.data import BatchAugment

    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, device="cuda")
    aug = BatchAugment("crop_flip", auto_augment=spec, fill=(0.5, 0.5, 0.5))
    whole = aug(x, torch.Generator(device="cuda").manual_seed(0))
    assert whole.device.type == "cuda" and whole.dtype == torch.uint8 and not torch.equal(whole, x)
    assert torch.equal(whole, aug(x, torch.Generator(device="cuda").manual_seed(0)))
    parts = [aug(x[k * 8:(k + 1) * 8], torch.Generator(device="cuda").manual_seed(0), (k, 4)) for k in range(4)]
    assert torch.equal(torch.cat(parts), whole)


def test_the_training_feed_augments_on_cuda_exactly_as_on_the_cpu():
    """One seed, one augmentation on any device: the crops and flips are drawn from CPU generators (a CUDA
    generator draws other numbers from the same seed)."""
    from clcli.train import _dist, load_data
    from clcli.train._feed import Feed

    recipe = tiny_recipe()
    raw = []
    for device in ("cpu", "cuda"):
        data = load_data(recipe, torch.device(device))
        feed = Feed(data, recipe, _cl_method(device), _dist.Dist())
        raw.append(next(feed.epoch(0)).raw[0].cpu())
    assert torch.equal(raw[0], raw[1])
