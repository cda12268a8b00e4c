"""Step-time benchmark: does collaborative learning cost more than training the networks alone?

Measures, in one process on the same batch, the training step (forward, backward, SGD step) of network A alone,
network B alone and the CL cohort (both networks with their MKBs and every loss), in alternating rounds so that all
three see the same machine, and reports medians and the ratio CL / (IL A + IL B) (goal: at most 1.10). Also the MKB
parameter and MAC overhead from the plan, and the W2 cost per step in different-input mode.
"""
from __future__ import annotations

import statistics
import time

GOAL_RATIO = 1.10


def _step_fn(method, batch, optimizer):
    def step():
        out = method(batch)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()

    return step


def run(models: list[str], *, input_size: int = 32, stem: str = "small", batch_size: int = 128,
        device: str = "auto", min_rounds: int = 5, min_seconds: float = 10.0, w2: bool = True) -> dict:
    import torch

    from clcli import probe, recipes
    from clcli.losses import W2Cache
    from clcli.methods import Batch, create
    from clcli.train import Cohort, build_cohort, resolve_device

    dev = resolve_device(device)
    plan = probe.plan(models, input_size, stem=stem)
    recipe = recipes.from_dict({"models": list(models), "input_size": input_size, "stem": stem})
    cl_cohort = build_cohort(plan, num_classes=10, seed=0, with_mkb=True).to(dev).train()
    il_cohort = build_cohort(plan, num_classes=10, seed=0, with_mkb=False).to(dev).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, input_size, input_size, generator=g).to(dev)
    y = torch.randint(0, 10, (batch_size,), generator=g).to(dev)
    idx = torch.arange(batch_size, device=dev)
    n = len(models)
    steps = {}
    for i, (net, name) in enumerate(zip(il_cohort.networks, il_cohort.names)):
        alone = create("il", Cohort([net], [name]), recipe)
        steps[f"il:{name}"] = _step_fn(alone, Batch([x], [y], [idx], [x]), torch.optim.SGD(net.parameters(), lr=0.01))
    cl = create("cl", cl_cohort, recipe)
    steps["cl"] = _step_fn(cl, Batch([x] * n, [y] * n, [idx] * n, [x] * n), torch.optim.SGD(cl.parameters(), lr=0.01))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for fn in steps.values():  # warm-up
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    start = time.perf_counter()
    while min(len(v) for v in times.values()) < min_rounds or time.perf_counter() - start < min_seconds:
        for k, fn in steps.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    il_total = sum(v for k, v in med.items() if k.startswith("il:"))
    result = {
        "models": models, "input_size": input_size, "stem": stem, "batch_size": batch_size, "device": str(dev),
        "threads": torch.get_num_threads(), "rounds": min(len(v) for v in times.values()),
        "step_seconds": {k: round(v, 5) for k, v in med.items()},
        "ratio_cl_over_il_sum": round(med["cl"] / il_total, 4),
        "goal_ratio": GOAL_RATIO,
        "mkb": [{"site": f"{s.size[0]}x{s.size[1]}", "embedding": s.mkb.embedding,
                 "half_params": [h.params for h in s.mkb.halves],
                 "param_overhead": [h.fraction for h in s.mkb.halves],
                 "mac_overhead": [round(h.macs / max(m.macs, 1), 5) for h, m in zip(s.mkb.halves, plan.models)]}
                for s in plan.sites],
    }
    if w2:
        cache = W2Cache()
        t0 = time.perf_counter()
        cache.get(idx, idx.roll(1), x, x.roll(1, dims=0))  # every pair is new: the uncached cost per step
        result["w2_seconds_per_step_uncached"] = round(time.perf_counter() - t0, 5)
    return result
