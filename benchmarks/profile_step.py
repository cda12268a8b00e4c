"""Where does the CL step spend more than IL A + IL B? torch.profiler, operator by operator.

Profiles `--steps` training steps of each kind built by `clcli.bench.make_steps` (the steps `clcli bench` times: the
same batch, SGD with momentum, the CL cohort with its MKBs and losses) and prints, per aten operator, the self CPU
time per step of IL A + IL B, of CL and their difference, largest first; then totals and operator counts.

    python benchmarks/profile_step.py [resnet10t mobilenetv3_small_050] [--threads 1] [--steps 3] [--json]
    python benchmarks/profile_step.py --unpaired   # metric loss once per network and peer (before the pair sum)

On a GPU (--device cuda) the self CUDA time is reported instead.
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["resnet10t", "mobilenetv3_small_050"])
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--stem", default="small")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps of each kind (after 2 warm-up steps)")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--unpaired", action="store_true",
                        help="evaluate the metric loss per network and peer, as before losses.summed_metric_loss")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from clcli import bench, losses

    torch.set_num_threads(args.threads)
    if args.unpaired:
        losses.SYMMETRIC.clear()  # CollaborativeLearning then takes the per-network path
    steps, _, dev = bench.make_steps(args.models, input_size=args.input_size, stem=args.stem,
                                     batch_size=args.batch_size, device=args.device)
    cuda = dev.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    per_op: dict[str, dict[str, tuple[float, float]]] = {}
    for name, fn in steps.items():
        for _ in range(2):
            fn()
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                fn()
            bench._sync(dev)
        per_op[name] = {e.key: ((e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 / args.steps,
                                e.count / args.steps)
                        for e in prof.key_averages() if e.key.startswith("aten::")}
    il = [k for k in steps if k.startswith("il:")]
    rows = []
    for op in set().union(*per_op.values()):
        il_ms = sum(per_op[k].get(op, (0, 0))[0] for k in il)
        il_n = sum(per_op[k].get(op, (0, 0))[1] for k in il)
        cl_ms, cl_n = per_op["cl"].get(op, (0, 0))
        rows.append({"op": op, "il_ms": round(il_ms, 3), "cl_ms": round(cl_ms, 3), "diff_ms": round(cl_ms - il_ms, 3),
                     "il_calls": il_n, "cl_calls": cl_n})
    rows.sort(key=lambda r: -r["diff_ms"])
    totals = {k: round(sum(v[0] for v in per_op[k].values()), 2) for k in per_op}
    calls = {k: sum(v[1] for v in per_op[k].values()) for k in per_op}
    result = {"models": args.models, "device": str(dev), "threads": torch.get_num_threads(),
              "unpaired": args.unpaired, "ms_per_step": totals, "aten_calls_per_step": calls,
              "ratio_ms": round(totals["cl"] / sum(totals[k] for k in il), 4), "ops": rows[: args.top]}
    if args.json:
        print(json.dumps(result))
        return result
    clock = "CUDA" if cuda else "CPU"
    print(f"self {clock} ms per step (aten ops), {dev}, {result['threads']} threads, {args.steps} steps each"
          + (", unpaired metric loss" if args.unpaired else ""))
    print(f"{'operator':40s} {'IL A+B':>9s} {'CL':>9s} {'CL-IL':>8s} {'calls IL':>8s} {'calls CL':>8s}")
    for r in rows[: args.top]:
        print(f"{r['op'][:40]:40s} {r['il_ms']:9.2f} {r['cl_ms']:9.2f} {r['diff_ms']:8.2f} {r['il_calls']:8.0f} "
              f"{r['cl_calls']:8.0f}")
    print("total: " + ", ".join(f"{k} {v:.1f} ms" for k, v in totals.items())
          + f"; CL / (IL sum) {result['ratio_ms']:.3f}")
    print("aten calls per step: " + ", ".join(f"{k} {v:.0f}" for k, v in calls.items()))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
