"""Does every timm family export to ONNX with its MKB half? The train-zoo's representatives (one per `timm.models`
module, its smallest model; `benchmarks/train_zoo.py`), each at its own input size with ImageNet stems, paired with
train_zoo's partner for the probe plan; the representative's network (its MKB half's gate set away from the identity,
so that the half changes the logits) goes through `clcli.export.export_onnx`: the dynamo exporter, onnx.checker, and
ONNX Runtime against PyTorch on a fixed batch. No training: the export sees the same modules a trained network has.

    python benchmarks/onnx_zoo.py --out docs/results/onnx_zoo.json                   # every family (resumable)
    python benchmarks/onnx_zoo.py --out /tmp/o.json --families resnet,vgg --retry    # some families again
    python benchmarks/onnx_zoo.py --out docs/results/onnx_zoo.json --markdown        # the tables of docs/results.md

Per family: `ok` (exported, checker passed, ONNX Runtime within tolerance, with the errors and seconds), `refused`
(a one-line ClcliError, sorted by kind: export, checker, runtime, mismatch), `bug` (any other exception, with
where it was raised) or `timeout`. One worker process per family, with a CPU-time limit and a memory cap.
"""
from __future__ import annotations

import json
import signal
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_zoo  # noqa: E402 - the family list, the representatives, the partner and the worker helpers

KINDS = {  # the words of each one-line refusal of export_onnx, in the order they are tried
    "checker": "fails onnx.checker",
    "runtime": "ONNX Runtime cannot run",
    "mismatch": "outputs differ",
    "export": "cannot be exported to ONNX",
}


def kind_of(message: str) -> str:
    return next((k for k, words in KINDS.items() if words in message), "other")


def export_family(model: str, size: int, work: Path) -> dict:
    """Plan [model, partner] at `size`, build the cohort with MKBs, export the model's network. Raises on failure.
    Adds the CPU seconds of the export alone (trace, translate, checker, ONNX Runtime check) to its result."""
    import torch

    from clcli import mkb, probe
    from clcli.cohort import build_cohort
    from clcli.export import export_onnx

    plan = probe.plan([model, train_zoo.PARTNER], size, stem="imagenet", mkbs=1, num_classes=2)
    cohort = build_cohort(plan, num_classes=2, seed=0, with_mkb=True).eval()
    net = cohort.networks[0]
    mkb.init_gates(net, 0.5)  # M != 0: a wrong or missing MKB half in the graph changes the logits
    manifest = {"model": model, "input_size": list(plan.input_size), "mean": [0.5] * 3, "std": [0.25] * 3,
                "class_names": ["class0", "class1"]}
    site = plan.sites[0].taps[0]
    cpu_start = time.process_time()
    with torch.no_grad():
        result = export_onnx(net, manifest, work / f"{model}.onnx")
    result.update(onnx_cpu_seconds=round(time.process_time() - cpu_start, 1), layout=site.layout,
                  site="hooked" if site.module else "spliced",
                  onnx_mib=round(sum((work / name).stat().st_size for name in (result["onnx_file"],
                                     result.get("onnx_data_file")) if name) / 2**20, 1))  # with external data
    return result


def _cpu_limit(seconds: int) -> None:
    """TimeoutError after `seconds` of this process's CPU time: on a shared machine at idle priority a wall-clock
    limit would measure the other users' load, not the model."""
    def handler(signum, frame):
        raise TimeoutError(f"over {seconds} CPU seconds")

    signal.signal(signal.SIGPROF, handler)
    signal.setitimer(signal.ITIMER_PROF, seconds)


def _run_family(args) -> tuple[str, dict]:
    family, model, size, timeout = args
    import torch

    from clcli.errors import ClcliError, one_line

    torch.set_num_threads(1)
    start, cpu_start = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="onnx_zoo_") as tmp:
        try:
            _cpu_limit(timeout)
            result = {"status": "ok", **export_family(model, size, Path(tmp))}
        except ClcliError as e:
            result = {"status": "refused", "kind": kind_of(str(e)), "error": str(e)}
        except TimeoutError as e:
            result = {"status": "timeout", "error": str(e)}
        except BaseException as e:  # noqa: BLE001 - a traceback: a bug to fix
            result = {"status": "bug", "error": one_line(e, 300) + train_zoo._where(e)}
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
    result.update(input_size=size, seconds=round(time.perf_counter() - start, 1),
                  cpu_seconds=round(time.process_time() - cpu_start, 1))
    return family, result


def summarise(families: dict) -> dict:
    results = [f.get("onnx", {}) for f in families.values()]
    statuses = [r.get("status", "not run") for r in results]
    kinds = [r["kind"] for r in results if r.get("status") == "refused"]
    ok = [r for r in results if r.get("status") == "ok"]
    walls = sorted(r["onnx_seconds"] for r in ok)
    times = sorted(r["onnx_cpu_seconds"] for r in ok if "onnx_cpu_seconds" in r)
    return {"families": len(families), "partner": train_zoo.PARTNER,
            **{s: statuses.count(s) for s in ("ok", "refused", "bug", "timeout", "not run")},
            "refused_by_kind": {k: kinds.count(k) for k in sorted(set(kinds))},
            "export_seconds": {"median": walls[len(walls) // 2], "max": walls[-1]} if walls else {},
            "export_cpu_seconds": {"median": times[len(times) // 2], "max": times[-1], "families": len(times)}
            if times else {},
            "max_abs_error": max((r["onnx_max_abs_error"] for r in ok), default=None),
            "max_rel_error": max((r["onnx_max_rel_error"] for r in ok), default=None)}


def markdown(results: dict) -> str:
    """The JSON as docs/results.md shows it: the counts, then every family not ok."""
    s, families = results["summary"], results["families"]
    kinds = ", ".join(f"{k} {n}" for k, n in s["refused_by_kind"].items()) or "none"
    t, cpu = s.get("export_seconds") or {}, s.get("export_cpu_seconds") or {}
    lines = ["| families | exported, checker and ONNX Runtime pass | refused (one line) | bug | timeout | not run |",
             "|---|---|---|---|---|---|",
             f"| {s['families']} | {s['ok']} | {s['refused']} ({kinds}) | {s['bug']} | {s['timeout']} | "
             f"{s['not run']} |", "",
             f"Seconds per export (trace, translate, checker, ONNX Runtime check; one thread; wall clock on the shared "
             f"machine): median {t.get('median', '-')}, max {t.get('max', '-')}"
             + (f"; CPU seconds (recorded for {cpu['families']}): median {cpu['median']}, max {cpu['max']}" if cpu
                else "")
             + f". Largest error against PyTorch: {s['max_abs_error']:.2g} absolute, {s['max_rel_error']:.2g} "
             f"relative to the largest logit." if t else "",
             "", "| family (representative, size) | result |", "|---|---|"]
    for family, f in families.items():
        r = f.get("onnx", {})
        if r and r.get("status") != "ok":
            error = r.get("error", "").replace("|", "\\|")
            kind = f" ({r['kind']})" if "kind" in r else ""
            lines.append(f"| {family} ({f.get('model', '?')}, {r.get('input_size', '?')}) | "
                         f"{r.get('status', 'not run')}{kind}: {error[:260]} |")
    return "\n".join(lines)


def main() -> None:
    parser = train_zoo.zoo_parser(__doc__, "onnx_zoo.json", workers=1, timeout_help="CPU seconds per family")
    parser.add_argument("--zoo", default=str(Path(__file__).resolve().parent.parent / "docs/results/train_zoo.json"),
                        help="train_zoo's results: its representatives and their own sizes are reused")
    parser.add_argument("--retry", action="store_true", help="redo the named families (or, without --families, "
                        "every family not ok)")
    args = parser.parse_args()

    out = Path(args.out)
    if args.markdown:
        print(markdown(json.loads(out.read_text())))
        return

    from clcli import files

    done = train_zoo.recorded(out)
    zoo = train_zoo.recorded(Path(args.zoo))
    families = train_zoo.chosen_families(args.families, parser)

    def wanted(family: str) -> bool:
        status = done.get(family, {}).get("onnx", {}).get("status")
        return status is None or args.retry and (bool(args.families) or status != "ok")

    def save() -> None:
        ordered = dict(sorted(done.items()))
        files.write_json(out, {"summary": summarise(ordered), "families": ordered})

    start = time.perf_counter()
    ctx = get_context("spawn")
    with ctx.Pool(args.workers, initializer=train_zoo._init, initargs=(args.memory_gib,), maxtasksperchild=1) as pool:
        search = [f for f in families if "model" not in zoo.get(f, {}) and "model" not in done.get(f, {})]
        for entry in pool.imap_unordered(train_zoo._find_representative, [(f, args.timeout) for f in search]):
            zoo[entry["family"]] = entry
        for f in families:
            if "model" in zoo.get(f, {}):
                done.setdefault(f, {}).update(model=zoo[f]["model"], params=zoo[f].get("params"),
                                              own_size=zoo[f]["own_size"])
        tasks = [(f, done[f]["model"], done[f]["own_size"], args.timeout) for f in families
                 if "model" in done.get(f, {}) and wanted(f)]
        print(f"{len(tasks)} families to export", file=sys.stderr, flush=True)
        for i, (family, result) in enumerate(pool.imap_unordered(_run_family, tasks), 1):
            done[family]["onnx"] = result
            print(f"{i}/{len(tasks)} {family} ({done[family]['model']}, {result['input_size']}): {result['status']} "
                  f"{result.get('error', '')[:200]} [{time.perf_counter() - start:.0f}s]", file=sys.stderr,
                  flush=True)
            save()
    save()
    summary = summarise(dict(sorted(done.items())))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
