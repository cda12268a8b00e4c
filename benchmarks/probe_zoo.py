"""Probe every model in timm.list_models() on the meta device and report how many fx analyses, how many need the
torch.export fallback, and which fail; and, for each model, whether the probe offers every stage of timm's own
`feature_info` of 2x2 or more (sizes from a meta-device forward of the `features_only` model): a stage counts as found
when a tap the probe offers has its size and sits at the stage's own output or after it (a module later in the same
stage), not merely when some tap of the same size exists (a stem output of the first stage's size does not count).

    python benchmarks/probe_zoo.py --out docs/results/probe_zoo.json            # the whole zoo (about half an hour)
    python benchmarks/probe_zoo.py --every 10 --out /tmp/zoo_sample.json        # every 10th name
    python benchmarks/probe_zoo.py --names pit_ti_224,coat_tiny --out docs/results/probe_zoo.json   # re-probe some,
                                                                                 # merged into the existing file

Each model runs in a worker process with a time limit and a memory cap, so that one model cannot take the sweep
down; workers are recycled regularly.
"""
from __future__ import annotations

import argparse
import json
import resource
import signal
import sys
import time
from pathlib import Path
from multiprocessing import get_context


def _limit_memory(gib: float) -> None:
    limit = int(gib * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _probe_one(args) -> dict:
    name, timeout = args

    def _alarm(signum, frame):
        raise TimeoutError(f"over {timeout}s")

    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    start = time.perf_counter()
    try:
        import timm

        from clcli import probe

        cfg = timm.models.get_pretrained_cfg(name)
        size = tuple(cfg.input_size[-2:]) if cfg is not None and cfg.input_size else (224, 224)
        m = probe.analyse(name, size, num_classes=1000)
        result = {"name": name, "status": m.tracer, "taps": len(m.stage_taps),
                  "usable_site": probe.has_site(m.stage_taps),
                  "layouts": sorted({t.layout for t in m.stage_taps}), "input_size": list(size)}
        result["stages"] = _stage_coverage(name, size, m)
    except BaseException as e:  # noqa: BLE001 - a sweep records every failure and goes on
        text = str(e).strip().splitlines()
        result = {"name": name, "status": "failed", "error": f"{type(e).__name__}: {text[0][:200] if text else ''}"}
    finally:
        signal.alarm(0)
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def feature_sizes(name: str, size: tuple[int, int]) -> list[tuple[int, int]]:
    """The spatial size of each stage timm's `features_only` model returns, from a forward on the meta device."""
    import torch
    import timm

    from clcli import models

    kwargs = models.model_kwargs(name, num_classes=0, input_size=size)
    kwargs.pop("num_classes")
    with torch.device("meta"):
        net = timm.create_model(name, pretrained=False, features_only=True, **kwargs).eval()
    with torch.no_grad():
        outputs = net(torch.empty(1, 3, *size, device="meta"))
    sizes = []
    for out, channels in zip(outputs, net.feature_info.channels()):
        shape = tuple(out.shape)
        if len(shape) == 4:  # NCHW, or NHWC where the last dim holds the channels
            sizes.append(shape[1:3] if shape[-1] == channels and shape[1] != channels else shape[2:])
        elif len(shape) == 3:  # tokens: a square grid after any prefix the model declares
            prefix = getattr(net, "num_prefix_tokens", 0) or 0
            side = round((shape[1] - prefix) ** 0.5)
            sizes.append((side, side))
    return sizes


def _stage_coverage(name: str, size: tuple[int, int], m) -> dict:
    """timm's stages of 2x2 or more and those the probe offers (by module: a stage tap of the stage's size at or
    after the node that ends the stage's module): {"sizes", "found", "missing"} or {"error"}."""
    try:
        sizes = feature_sizes(name, size)
    except Exception as e:  # noqa: BLE001 - no features_only for this model: recorded, not a probe failure
        text = str(e).strip().splitlines()
        return {"error": f"{type(e).__name__}: {text[0][:160] if text else ''}"}
    # where the graph does not show a stage's module (no such scope, or a features_only model with other stages),
    # the stage is counted by size alone, and the count says how many were
    ends = m.feature_stages if len(m.feature_stages) == len(sizes) else [(None, None, None, None)] * len(sizes)
    stages, missing, by_size = [], [], 0
    for s, (module, _, depth, _) in zip(sizes, ends):
        if min(s) < 2:
            continue
        stages.append(tuple(s))
        by_size += depth is None
        if not any(t.size == tuple(s) and (depth is None or t.depth >= depth) for t in m.stage_taps):
            missing.append({"size": list(s), "module": module})
    return {"sizes": [list(s) for s in stages], "found": len(stages) - len(missing), "missing": missing,
            "by_size_only": by_size}


def _init(gib: float) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    _limit_memory(gib)


def _coverage_summary(results: list[dict]) -> dict:
    """Over every model: timm's stages of 2x2 or more, how many the probe finds at the same size, the models with a
    stage not found, and the models timm cannot build `features_only`."""
    covered = [r for r in results if "sizes" in r.get("stages", {})]
    return {
        "models_with_feature_info": len(covered),
        "stages": sum(len(r["stages"]["sizes"]) for r in covered),
        "found": sum(r["stages"]["found"] for r in covered),
        "counted_by_size_only": sum(r["stages"].get("by_size_only", 0) for r in covered),
        "models_all_found": sum(r["stages"]["found"] == len(r["stages"]["sizes"]) for r in covered),
        "models_missing": sorted(r["name"] for r in covered if r["stages"]["found"] < len(r["stages"]["sizes"])),
        "no_feature_info": sorted(r["name"] for r in results if "error" in r.get("stages", {})),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="probe_zoo.json")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--every", type=int, default=1, help="probe every k-th model name (a sample)")
    parser.add_argument("--names", default="", help="comma-separated models to (re-)probe, merged into --out")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per model")
    parser.add_argument("--memory-gib", type=float, default=8.0, help="address-space cap per worker")
    args = parser.parse_args()

    import timm

    names = [n for n in args.names.split(",") if n] or timm.list_models()[:: args.every]
    start = time.perf_counter()
    results = []
    earlier = {}
    if args.names and Path(args.out).is_file():  # a partial re-run: keep every other model's earlier result
        before = json.loads(Path(args.out).read_text())
        earlier = {r["name"]: r for r in before["results"] if r["name"] not in names}
    ctx = get_context("spawn")
    with ctx.Pool(args.workers, initializer=_init, initargs=(args.memory_gib,), maxtasksperchild=25) as pool:
        for i, r in enumerate(pool.imap_unordered(_probe_one, [(n, args.timeout) for n in names]), 1):
            results.append(r)
            if i % 50 == 0 or i == len(names):
                print(f"{i}/{len(names)} probed, {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    total = time.perf_counter() - start
    rerun = len(results)
    results += list(earlier.values())
    counts = {s: sum(r["status"] == s for r in results) for s in ("fx", "export", "failed")}
    summary = {
        "models": len(results),
        "timm": timm.__version__,
        "every": args.every,
        "fraction_fx": round(counts["fx"] / len(results), 4),
        "fraction_export": round(counts["export"] / len(results), 4),
        "fraction_failed": round(counts["failed"] / len(results), 4),
        "fraction_analysed": round((counts["fx"] + counts["export"]) / len(results), 4),
        "no_taps": sorted(r["name"] for r in results if r["status"] != "failed" and r["taps"] == 0),
        # a stage tap of 2x2 or more: somewhere an MKB can go (models probed before this field: any tap counts)
        "usable_site": sum(r["status"] != "failed" and r.get("usable_site", r["taps"] > 0) for r in results),
        "stage_coverage": _coverage_summary(results),
        "failures": sorted(({"name": r["name"], "error": r["error"]} for r in results if r["status"] == "failed"),
                           key=lambda r: r["name"]),
        # the whole-zoo time stays that of the last whole run
        "total_seconds": round(total, 1) if not earlier else before["summary"].get("total_seconds"),
        "last_run": {"models": rerun, "seconds": round(total, 1)} if earlier else None,
        "workers": args.workers if not earlier else before["summary"].get("workers"),
    }
    with open(args.out, "w") as f:
        json.dump({"summary": summary, "results": sorted(results, key=lambda r: r["name"])}, f, indent=1)
    coverage = summary["stage_coverage"]
    print(json.dumps({k: v for k, v in summary.items() if k not in ("failures", "no_taps", "stage_coverage")},
                     indent=1))
    print(f"stages of timm's feature_info found: {coverage['found']}/{coverage['stages']} in "
          f"{coverage['models_with_feature_info']} models ({coverage['models_all_found']} with every stage); "
          f"no features_only model: {len(coverage['no_feature_info'])}")
    print(f"failures: {len(summary['failures'])}, analysed without any spatial tap: {len(summary['no_taps'])}")


if __name__ == "__main__":
    main()
