"""Step-time benchmark: does collaborative learning cost more than training the networks alone?

`run(models)` measures, in one process:

- the training step (`clcli.train.train_step`: forward, backward, the optimiser step; the optimiser, its parameter
  groups, clipping and mixed precision built by `clcli.train.Optimisation` as training builds them, from the default
  recipe with `--set train.*` overrides: SGD with momentum and weight decay unless `--set train.opt=adamw`, ...) of
  network A alone, network B alone and the CL cohort (both networks with their MKBs and every loss, siamese input,
  simultaneous), all on the same batch and in alternating rounds so that all three see the same machine. It reports
  medians of wall time (with a device synchronisation around each step on CUDA) and, on the CPU, of the process's
  CPU time, which on a shared machine leaves out the time the process waits for its cores. Ratio
  CL / (IL A + IL B), goal at most 1.10;
- the aten operators each step dispatches (on a GPU, about one kernel launch each: what small models pay for);
- the MKB parameter and MAC overhead, from the plan;
- the images/s of the training loop's data pipeline (epoch order, uint8 gather, augmentation, normalisation);
- the W2 cost per step in different-input mode: W2^2 solved for a batch of new pairs, and looked up once cached;
  and the whole WEL step with new pairs (its first epoch) and cached ones (the epochs after).

`benchmarks/profile_step.py` profiles the same steps operator by operator.
"""
from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Sequence

GOAL_RATIO = 1.10


def bench_recipe(models: list[str], *, input_size: int = 32, stem: str = "small", amp: bool = True, seed: int = 0,
                 overrides: Sequence[str] = ()):
    """The recipe whose training step bench times: the defaults with `overrides` (`--set`, the `train.` keys that
    build the step: train.opt, train.lr, train.momentum, train.weight_decay, train.clip_grad, ...), on `models` at
    `input_size` with `stem`, which are bench's own options."""
    from clcli import recipes
    from clcli.errors import ClcliError

    raw = {"models": list(models), "input_size": input_size, "stem": stem, "train": {"amp": amp, "seed": seed}}
    for assignment in overrides:
        if not assignment.startswith("train."):
            raise ClcliError(f"bench --set takes train.* keys (the step it times), got '{assignment}'; the models, "
                             "input size and stem are bench's own options")
        recipes.apply_override(raw, assignment)
    return recipes.from_dict(raw, "bench --set" if overrides else "bench")


def training_step(method, recipe, dev):
    """`step(batch)`: one training step of `method` as `clcli train` takes it, `train.train_step` with the optimiser,
    parameter groups, clipping and mixed precision that `train.Optimisation` builds from `recipe`."""
    from clcli.train import Optimisation, train_step

    optimisation = Optimisation(method, recipe, steps_per_epoch=1, device=dev)
    method.train()
    return functools.partial(train_step, method, optimizer=optimisation.optimizer, autocast=optimisation.autocast,
                             scaler=optimisation.scaler,
                             clip=optimisation.clip if recipe.train.clip_grad is not None else None)


def make_steps(models: list[str], *, input_size: int = 32, stem: str = "small", batch_size: int = 128,
               device: str = "auto", amp: bool = True, channels_last: bool = False, compile: bool = False,
               seed: int = 0, overrides: Sequence[str] = ()):
    """{"il:<A>": step, "il:<B>": step, "cl": step} on one fixed batch, the plan, and the device. Each step is one
    optimiser step of `clcli train` (`training_step` with the optimiser of `bench_recipe`: by default SGD, momentum
    0.9, weight decay 1e-4; bf16/fp16 autocast on CUDA; with `compile`, each network torch.compiled after its MKB
    halves are hooked in, as `train.compile` does)."""
    import torch

    from clcli import probe
    from clcli.cohort import Cohort, build_cohort, compile_networks
    from clcli.methods import Batch, create
    from clcli.train import resolve_device

    recipe = bench_recipe(models, input_size=input_size, stem=stem, amp=amp, seed=seed, overrides=overrides)
    dev = resolve_device(device)
    plan = probe.plan(models, input_size, stem=stem)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    cl_cohort = build_cohort(plan, num_classes=10, seed=seed, with_mkb=True).to(dev, memory_format=memory_format)
    il_cohort = build_cohort(plan, num_classes=10, seed=seed, with_mkb=False).to(dev, memory_format=memory_format)
    if compile:
        compile_networks(il_cohort)
        compile_networks(cl_cohort)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, input_size, input_size, generator=g).to(dev, memory_format=memory_format)
    y = torch.randint(0, 10, (batch_size,), generator=g).to(dev)
    idx = torch.arange(batch_size)
    n = len(models)

    steps = {}
    for net, name in zip(il_cohort.networks, il_cohort.names):
        alone = create("il", Cohort([net], [name]), recipe)
        steps[f"il:{name}"] = functools.partial(training_step(alone, recipe, dev), Batch([x], [y], [idx], [x]))
    cl = create("cl", cl_cohort, recipe)
    steps["cl"] = functools.partial(training_step(cl, recipe, dev), Batch([x] * n, [y] * n, [idx] * n, [x] * n))
    return steps, plan, dev


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_steps(steps: dict, dev, *, min_rounds: int, min_seconds: float, warmup: int = 2) -> dict:
    """{name: {"wall": [...], "cpu": [...]}} seconds per step, in alternating rounds."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    _sync(dev)
    times: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in steps}
    start = time.perf_counter()
    while min(len(v["wall"]) for v in times.values()) < min_rounds or time.perf_counter() - start < min_seconds:
        for k, fn in steps.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            _sync(dev)
            times[k]["wall"].append(time.perf_counter() - t0)
            times[k]["cpu"].append(time.process_time() - c0)
    return times


def count_ops(fn) -> int:
    """aten operators dispatched by one call of `fn` (on a GPU, roughly its kernel launches), run eagerly: compiled
    networks are counted as written, not as their fused kernels."""
    from contextlib import nullcontext

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6; compile nothing inside the count
    with set_stance("force_eager") if set_stance is not None else nullcontext(), Count():
        fn()
    return Count.n


def pipeline_batches(images, labels, *, batch_size: int, augment: str = "crop_flip", seed: int = 0,
                     auto_augment: str | None = None, re_prob: float = 0.0):
    """A callable giving the next normalised (x, y) batch exactly as the training loop makes it from in-memory uint8
    images: seeded epoch order, uint8 gather on the images' device, batch augmentation (crop/flip, then
    `auto_augment`), normalisation, then random erasing (`re_prob`)."""
    import torch

    from clcli.data import BatchAugment, batch_erasing, channel_stats, epoch_batches, to_input
    from clcli.recipes import DataConfig

    dev = images.device
    mean, std = channel_stats(images.cpu())
    aug = BatchAugment(augment, auto_augment=auto_augment, fill=mean)
    erase = batch_erasing(DataConfig(re_prob=re_prob), dev)
    gen = torch.Generator().manual_seed(seed)  # on the CPU, as the training loop draws
    state = {"epoch": 0, "step": 0, "order": epoch_batches(len(images), batch_size, seed=seed, epoch=0)}

    def next_batch():
        if state["step"] == len(state["order"]):
            state["epoch"] += 1
            state["step"] = 0
            state["order"] = epoch_batches(len(images), batch_size, seed=seed, epoch=state["epoch"])
        idx = state["order"][state["step"]].to(dev)
        state["step"] += 1
        x = to_input(aug(images[idx], gen), mean, std)
        return (x if erase is None else erase(x)), labels[idx]

    return next_batch


def pipeline_rate(data, dev, *, batch_size: int, min_rounds: int, min_seconds: float, augment: str = "crop_flip"):
    """Images/s of the training loop's data pipeline on decoded images `data` (ImageTensors), in memory on `dev`."""
    next_batch = pipeline_batches(data.images.to(dev), data.labels.to(dev), batch_size=batch_size, augment=augment)
    per_round = 10

    def ten_batches():
        for _ in range(per_round):
            next_batch()

    times = time_steps({"pipeline": ten_batches}, dev, min_rounds=min_rounds, min_seconds=min_seconds, warmup=1)
    return per_round * batch_size / statistics.median(times["pipeline"]["wall"])


def w2_cost(images, batch_size: int, *, rounds: int = 3, grid: int = 8) -> dict:
    """Seconds per step for the W2^2 targets of one network pair in different-input mode (POT on the CPU), on
    uint8 `images`."""
    import torch

    from clcli.losses import W2Cache

    cache = W2Cache(grid=grid)
    uncached, cached = [], []
    for r in range(rounds):
        a = torch.arange(r * batch_size, (r + 1) * batch_size) % len(images)
        b = (a + len(images) // 2) % len(images)
        t0 = time.perf_counter()
        cache.get(a, b, images[a], images[b])  # new pairs: solved
        uncached.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        cache.get(a, b, images[a], images[b])  # the same pairs again: looked up
        cached.append(time.perf_counter() - t0)
    return {"uncached": statistics.median(uncached), "cached": statistics.median(cached)}


def wel_step_cost(models: list[str], images, *, batch_size: int, input_size: int = 32, stem: str = "small",
                  device: str = "auto", rounds: int = 3, overrides: Sequence[str] = ()) -> dict:
    """Seconds per WEL training step (`train.train_step`: both networks, their embedding heads, the W2^2 targets)
    on batches of uint8 `images` (resized to `input_size`): with pairs never seen before (every step of the first
    epoch; before WEL's pairs were fixed, every step of every epoch) and with the pairs cached (later epochs)."""
    import torch
    import torch.nn.functional as F

    from clcli import probe
    from clcli.cohort import build_cohort
    from clcli.data import to_input
    from clcli.methods import Batch, create
    from clcli.train import resolve_device

    dev = resolve_device(device)
    recipe = bench_recipe(models, input_size=input_size, stem=stem, overrides=overrides)
    cohort = build_cohort(probe.plan(models, input_size, stem=stem), num_classes=10, seed=0,
                          with_mkb=False).to(dev)
    method = create("wel", cohort, recipe)
    step = training_step(method, recipe, dev)
    n = len(models)

    def batch(start: int):
        idx = torch.arange(start, start + batch_size) % len(images)
        raw = images[idx].to(dev)
        if raw.shape[-1] != input_size:
            raw = F.interpolate(raw.float(), size=input_size).round().clamp(0, 255).to(torch.uint8)
        x = to_input(raw, (0.5,) * 3, (0.25,) * 3)
        y = torch.zeros(batch_size, dtype=torch.int64, device=dev)
        return Batch([x] * n, [y] * n, [idx] * n, [raw] * n)

    def timed(b) -> float:
        t0 = time.perf_counter()
        step(b)
        _sync(dev)
        return time.perf_counter() - t0

    timed(batch(0))  # warm-up (and the first batch's pairs cached)
    new = [timed(batch((r + 1) * batch_size)) for r in range(rounds)]
    cached = [timed(batch(0)) for _ in range(rounds)]
    return {"new_pairs": statistics.median(new), "cached": statistics.median(cached),
            "w2_solved": method.w2_cache.misses}


def run(models: list[str], *, input_size: int = 32, stem: str = "small", batch_size: int = 128,
        device: str = "auto", threads: int | None = None, amp: bool = True, channels_last: bool = False,
        compile: bool = False, min_rounds: int = 5, min_seconds: float = 10.0, w2: bool = True,
        pipeline: bool = True, overrides: Sequence[str] = ()) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    steps, plan, dev = make_steps(models, input_size=input_size, stem=stem, batch_size=batch_size, device=device,
                                  amp=amp, channels_last=channels_last, compile=compile, overrides=overrides)
    ops = {k: count_ops(fn) for k, fn in steps.items()}
    times = time_steps(steps, dev, min_rounds=min_rounds, min_seconds=min_seconds)
    clocks = ("wall", "cpu") if dev.type == "cpu" else ("wall",)
    med = {clock: {k: statistics.median(v[clock]) for k, v in times.items()} for clock in clocks}
    ratio = {clock: m["cl"] / sum(v for k, v in m.items() if k.startswith("il:")) for clock, m in med.items()}
    # On a CPU shared with other work the CPU time is the steadier measure of the work a step does.
    main_clock = "cpu" if dev.type == "cpu" else "wall"
    il_ops = sum(v for k, v in ops.items() if k.startswith("il:"))
    result = {
        "models": list(models), "input_size": input_size, "stem": stem, "batch_size": batch_size,
        "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "amp": amp and dev.type == "cuda", "channels_last": channels_last,
        "compile": compile, "overrides": list(overrides), "torch": torch.__version__,
        "rounds": min(len(v["wall"]) for v in times.values()),
        "step_seconds": {k: round(v, 5) for k, v in med["wall"].items()},
        "step_cpu_seconds": {k: round(v, 5) for k, v in med["cpu"].items()} if "cpu" in med else None,
        "ratio_cl_over_il_sum": round(ratio[main_clock], 4),
        "ratio_clock": main_clock,
        "ratio_wall": round(ratio["wall"], 4),
        "goal_ratio": GOAL_RATIO,
        "goal_met": ratio[main_clock] <= GOAL_RATIO,
        "ops_per_step": ops,
        "ops_ratio_cl_over_il_sum": round(ops["cl"] / il_ops, 4),
        "mkb": [{"site": f"{s.size[0]}x{s.size[1]}", "embedding": s.mkb.embedding,
                 "taps": [t.module for t in s.taps],
                 "half_params": [h.params for h in s.mkb.halves],
                 "param_overhead": [h.fraction for h in s.mkb.halves],
                 "half_macs": [h.macs for h in s.mkb.halves],
                 "mac_overhead": [round(h.macs / max(m.macs, 1), 5) for h, m in zip(s.mkb.halves, plan.models)]}
                for s in plan.sites],
        "network_macs": {m.name: m.macs for m in plan.models},
    }
    cl_rate = batch_size / med[main_clock]["cl"]
    if pipeline or w2:  # both measure on the shipped CIFAR-10 subset, decoded once
        from clcli.data import QUICKSTART_DIR, load_image_tensors

        subset = load_image_tensors(str(QUICKSTART_DIR), "train")
    if pipeline:
        rate = pipeline_rate(subset, dev, batch_size=batch_size, min_rounds=min_rounds,
                             min_seconds=min(min_seconds, 3.0))
        result["pipeline"] = {"images_per_s": round(rate, 1), "images": len(subset), "augment": "crop_flip",
                              "cl_step_images_per_s": round(cl_rate, 1),
                              "ratio_pipeline_over_cl_step": round(rate / cl_rate, 1)}
    if w2:
        grid = 8
        cost = w2_cost(subset.images, batch_size, grid=grid)
        result["w2"] = {"seconds_per_step_uncached": round(cost["uncached"], 5),
                        "seconds_per_step_cached": round(cost["cached"], 6),
                        "uncached_over_cl_step": round(cost["uncached"] / med[main_clock]["cl"], 3),
                        "grid": grid, "pairs_per_step": batch_size}
        wel = wel_step_cost(models, subset.images, batch_size=batch_size, input_size=input_size, stem=stem,
                            device=device, overrides=overrides)
        result["wel"] = {"seconds_per_step_new_pairs": round(wel["new_pairs"], 5),
                         "seconds_per_step_cached": round(wel["cached"], 5), "pairs_per_step": batch_size // 2}
    return result
