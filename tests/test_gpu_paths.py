"""The code paths that training takes on a GPU, checked on the CPU where they can run there: the CL step under bf16
autocast, channels_last training, train.compile, and the memory option train.grad_checkpointing. tests/test_cuda.py
runs the first three on CUDA itself."""
import json
import warnings
from types import SimpleNamespace

import pytest
import torch

from clcli import probe, recipes
from clcli.cohort import Cohort, enable_grad_checkpointing
from clcli.errors import ClcliError
from clcli.tracing import splice
from clcli.methods import Batch, create
from clcli.train import build_cohort, mixed_precision, resume, train

from _helpers import TINY, tiny_recipe


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _cl_method(memory_format=torch.contiguous_format, grad_checkpointing=False):
    plan = probe.plan(TINY, 32, stem="small")
    cohort = build_cohort(plan, num_classes=10, seed=0, with_mkb=True).to(memory_format=memory_format)
    method = create("cl", cohort, recipes.from_dict({"models": TINY, "input_size": 32, "stem": "small"}))
    if grad_checkpointing:
        enable_grad_checkpointing(cohort)
    return method.train()


def _batch(n=16, memory_format=torch.contiguous_format):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (n,), generator=g)
    idx = torch.arange(n)
    return Batch([x, x], [y, y], [idx, idx], [x, x])


def _step(method, batch, **autocast):
    with torch.autocast("cpu", **autocast) if autocast else torch.autocast("cpu", enabled=False):
        out = method(batch)
    out["loss"].backward()
    return out, {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}


def test_mixed_precision_is_off_on_the_cpu():
    amp, _, scaler = mixed_precision(torch.device("cpu"), True)
    assert not amp and scaler is None


def test_a_gpu_without_native_bf16_trains_in_fp16_with_a_gradient_scaler(monkeypatch):
    """A V100 or T4: torch counts emulated bf16 as supported unless asked for native support only."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the scaler warns that this machine has no CUDA
        amp, dtype, scaler = mixed_precision(torch.device("cuda"), True)
    assert amp and dtype == torch.float16 and isinstance(scaler, torch.amp.GradScaler)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere and later
    assert mixed_precision(torch.device("cuda"), True)[1:] == (torch.bfloat16, None)


def test_an_fp16_run_interrupted_and_resumed_continues_with_the_gradient_scalers_state(tmp_path, monkeypatch):
    """What fp16 training adds to a checkpoint: the GradScaler's scale and growth tracker, here doubling every 3
    steps, so a resumed run that restarted them would scale differently from the uninterrupted one (and, in fp16,
    skip other steps). Autocast stays off: the CPU's fp16 kernels take minutes where float32 takes seconds, and the
    scaler's state is the same either way."""
    from clcli.train import _optim

    monkeypatch.setattr(_optim, "mixed_precision", lambda device, enabled: (
        False, torch.float16, torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)))
    torch.set_num_threads(1)

    def recipe():
        r = tiny_recipe(epochs=2)
        r.data.train_limit, r.data.test_limit, r.train.batch_size = 64, 16, 16  # 4 steps an epoch
        return r

    train(recipe(), tmp_path / "straight", show_progress=False)
    monkeypatch.setenv("CLCLI_FAULT_KILL_AT_STEP", "6")
    monkeypatch.setenv("CLCLI_FAULT_SIGNAL", "INT")
    with pytest.raises(KeyboardInterrupt):
        train(recipe(), tmp_path / "stopped", show_progress=False)
    monkeypatch.delenv("CLCLI_FAULT_KILL_AT_STEP")
    stopped = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)
    assert stopped["epoch"] == 1 and stopped["scaler"]["scale"] == 2.0 ** 11  # grown once in the first 4 steps
    resume(tmp_path / "stopped", show_progress=False)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)
    assert a["scaler"] == b["scaler"]
    for key, value in a["method"].items():
        torch.testing.assert_close(b["method"][key], value, rtol=0, atol=0, msg=key)


def test_cl_step_under_bf16_autocast_keeps_losses_and_gradients_in_float32():
    """What the loop does on CUDA (bf16 autocast), here under the CPU's autocast: bf16 logits, a float32 loss
    (the distances are computed in float32) close to the float32 step's, finite float32 gradients."""
    torch.set_num_threads(1)
    reference, _ = _step(_cl_method(), _batch())
    out, grads = _step(_cl_method(), _batch(), dtype=torch.bfloat16)
    assert all(logits.dtype == torch.bfloat16 for logits in out["logits"])
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert abs(out["loss"].item() - reference["loss"].item()) <= 0.05 * abs(reference["loss"].item())
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())


def test_speed_settings_on_cuda_only():
    """cuDNN's kernel benchmark and TF32 matmuls for CUDA training (and clcli bench); the CPU is left as it was."""
    from clcli.train import speed_settings

    saved = torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()
    try:
        torch.backends.cudnn.benchmark = False
        torch.set_float32_matmul_precision("highest")
        speed_settings(torch.device("cpu"))
        assert (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()) == (False, "highest")
        speed_settings(torch.device("cuda"))  # settable without a GPU: process-wide flags
        assert (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()) == (True, "high")
    finally:
        torch.backends.cudnn.benchmark = saved[0]
        torch.set_float32_matmul_precision(saved[1])


def test_evaluation_runs_under_trainings_autocast():
    import timm

    from clcli.train import evaluate

    net = timm.create_model("test_resnet", num_classes=10)
    dtypes = []
    net.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    evaluate(net, images, torch.zeros(4, dtype=torch.int64), (0.5,) * 3, (0.25,) * 3,
             autocast=(True, torch.bfloat16))  # the CPU's autocast here; CUDA's in training
    evaluate(net, images, torch.zeros(4, dtype=torch.int64), (0.5,) * 3, (0.25,) * 3)
    assert dtypes == [torch.bfloat16, torch.float32]


def test_a_channels_last_batch_is_made_in_one_copy_off_the_cpu():
    """uint8 to normalised float channels-last in one copy on a GPU (not a contiguous float copy, then a second
    one): checked on the meta device, which runs the same ops without data; the CPU keeps its faster two copies."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from clcli.data import to_input

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func.__name__.split(".")[0] in ("_to_copy", "clone", "copy_", "contiguous")
            return func(*args, **(kwargs or {}))

    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    counted = {}
    for device in ("meta", "cpu"):
        on_device = images.to(device)
        to_input(on_device, (0.5,) * 3, (0.25,) * 3)  # the normalisation's constants, made once per device
        with Copies() as copies:
            x = to_input(on_device, (0.5,) * 3, (0.25,) * 3, channels_last=True)
        counted[device] = copies.n
        assert x.is_contiguous(memory_format=torch.channels_last)
    assert counted == {"meta": 1, "cpu": 2}
    torch.testing.assert_close(x, to_input(images, (0.5,) * 3, (0.25,) * 3), rtol=0, atol=0)


def test_channels_last_step_computes_the_contiguous_step():
    """channels_last (train.channels_last) changes the memory layout only: the same loss as the contiguous step
    (rtol 1e-4) and the same gradients up to the rounding of the CPU's other convolution kernels. Measured: 2.7e-3
    relative L2 over all gradients, up to 2.6e-2 on single small ones (a BN bias), the same without MKBs (IL), so
    the whole gradient is held to 1e-2 and each gradient to 1e-1."""
    torch.set_num_threads(1)
    plain, plain_grads = _step(_cl_method(), _batch())
    last, last_grads = _step(_cl_method(torch.channels_last), _batch(memory_format=torch.channels_last))
    torch.testing.assert_close(last["loss"], plain["loss"], rtol=1e-4, atol=1e-5)
    assert plain_grads.keys() == last_grads.keys()
    whole = torch.cat([g.flatten() for g in plain_grads.values()])
    whole_last = torch.cat([last_grads[name].flatten() for name in plain_grads])
    assert ((whole_last - whole).norm() / whole.norm()).item() <= 1e-2
    for name, g in plain_grads.items():
        if g.norm() > 1e-3 * whole.norm():  # a near-zero gradient's relative difference is rounding noise
            err = ((last_grads[name] - g).norm() / g.norm()).item()
            assert err <= 1e-1, f"{name}: relative difference {err:.2e}"


def test_channels_last_training_run_finishes(tmp_path):
    recipe = tiny_recipe(epochs=1)
    recipe.data.train_limit, recipe.data.test_limit, recipe.train.channels_last = 64, 32, True
    summary = train(recipe, tmp_path / "run", show_progress=False)
    assert set(summary["cl"]["test_acc"]) == set(TINY)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "finished"


@pytest.fixture
def compile_with_eager_backend(monkeypatch):
    """train.compile with dynamo's `eager` backend: the networks are captured by torch.compile exactly as on a GPU
    (MKB hooks inside the captured graph), but no kernels are generated, which on a shared 2-core CPU takes minutes.
    Counts the networks compiled."""
    compiled = []
    original = torch.nn.Module.compile

    def compile_eagerly(self, *args, **kwargs):
        compiled.append(type(self).__name__)
        return original(self, *args, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", compile_eagerly)
    yield compiled
    torch._dynamo.reset()


@pytest.mark.slow  # dynamo captures 4 networks twice (train and eval): minutes on a busy 2-core CPU
def test_train_compile_trains_the_compiled_networks_as_eager_ones(tmp_path, compile_with_eager_backend):
    """IL then CL in one process with train.compile, as `clcli train` runs a recipe's methods: the compiled
    networks train to the weights the uncompiled ones reach (the MKB hooks run inside the compiled forward; a CL
    network must not reuse the graph captured for the IL network of the same class, which has no MKB)."""
    torch.set_num_threads(1)

    def run(out, compiled):
        recipe = tiny_recipe(methods=("il", "cl"), epochs=1)
        recipe.data.train_limit, recipe.data.test_limit, recipe.train.batch_size = 64, 32, 32
        recipe.train.compile = compiled
        train(recipe, out, show_progress=False)
        return {m: torch.load(out / m / "checkpoint.pt", weights_only=True)["method"] for m in ("il", "cl")}

    eager = run(tmp_path / "eager", False)
    compiled = run(tmp_path / "compiled", True)
    assert len(compile_with_eager_backend) == 4  # both networks, in IL and in CL
    for method in ("il", "cl"):
        assert compiled[method].keys() == eager[method].keys()
        for key, value in eager[method].items():
            torch.testing.assert_close(compiled[method][key], value, rtol=1e-4, atol=1e-5, msg=f"{method} {key}")


def test_grad_checkpointing_reruns_the_blocks_and_computes_the_plain_step():
    """train.grad_checkpointing: timm's checkpointed blocks, with the MKB hooks inside them, run again in the backward
    pass (each MKB half twice per step: the MKBs sit in whole stages, which timm never calls when checkpointing, so
    they hook into each stage's last block) and the step's loss and gradients are the plain step's."""
    torch.set_num_threads(1)
    plain, plain_grads = _step(_cl_method(), _batch())
    method = _cl_method(grad_checkpointing=True)
    runs = []
    for label, net in zip(method.cohort.labels, method.cohort.networks):
        # A pre-hook: the re-run stops once it has every saved tensor back, before forward hooks at a block's end.
        net.mkb["site0"].register_forward_pre_hook(lambda *_, label=label: runs.append(label))
    checkpointed, grads = _step(method, _batch())
    assert sorted(runs) == sorted(2 * method.cohort.labels)
    torch.testing.assert_close(checkpointed["loss"], plain["loss"], rtol=1e-5, atol=1e-6)
    assert grads.keys() == plain_grads.keys()
    for name, g in plain_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


class _Stage(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Conv2d(3, 3, 1), torch.nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.second(self.first(x))


class _RunsBlocksDirectlyWhenCheckpointing(torch.nn.Module):
    """A model whose checkpointing path calls a stage's blocks, not the stage (as timm's checkpoint_seq can)."""

    def __init__(self):
        super().__init__()
        self.stage, self.checkpointing = _Stage(), False

    def set_grad_checkpointing(self, enable=True):
        self.checkpointing = enable

    def forward(self, x):
        return self.stage.second(self.stage.first(x)) if self.checkpointing else self.stage(x)


def test_grad_checkpointing_that_cannot_apply_is_a_one_line_error(monkeypatch):
    plan = probe.plan(TINY, 32, stem="small")
    cohort = build_cohort(plan, num_classes=10, seed=0, with_mkb=False)
    splice(cohort.networks[0], {plan.sites[0].taps[0].node: torch.nn.Identity()}, what="a test")
    with pytest.raises(ClcliError, match="spliced into its graph"):
        enable_grad_checkpointing(cohort)

    cohort = build_cohort(plan, num_classes=10, seed=0, with_mkb=False)

    def unsupported(enable=True):
        raise AssertionError("gradient checkpointing not supported")  # what timm raises

    monkeypatch.setattr(cohort.networks[0], "set_grad_checkpointing", unsupported)
    with pytest.raises(ClcliError, match="test_resnet does not support train.grad_checkpointing"):
        enable_grad_checkpointing(cohort)

    model = _RunsBlocksDirectlyWhenCheckpointing()
    model.stage.register_forward_hook(lambda module, inputs, output: output * 2)  # where an MKB would fuse
    tiny_plan = SimpleNamespace(input_size=(4, 4), models=[SimpleNamespace(kwargs={})])
    with pytest.raises(ClcliError, match="no longer runs stage, where clcli hooks in"):
        enable_grad_checkpointing(Cohort([model], ["blocky"], plan=tiny_plan))
    assert not model.checkpointing  # left as it was
