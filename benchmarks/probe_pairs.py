"""Where do the planned MKB sites sit in each network? One model of every timm family (the train-zoo
representatives in docs/results/train_zoo.json) paired with a fixed CNN and a fixed ViT partner, planned at the
family model's own input size and at 32 px with `--stem small`; each network's site depth is recorded.

    python benchmarks/probe_pairs.py --out docs/results/probe_pairs.json
    PYTHONPATH=<an older checkout> python benchmarks/probe_pairs.py --out before.json     # the same with older code
    python benchmarks/probe_pairs.py --markdown docs/results/probe_pairs_before.json docs/results/probe_pairs.json

Depth is the probe's: a tap's position in the traced graph, 0 = input, 1 = head; place is its place among timm's
stages past the stem (0 = the end of the first stage past the stem, 1 = the end of the last, below 0 the stem;
None where the model has no feature_info), what the ranking reads since issue 34 (docs/probe.md). The summary counts
sites in a stem or at a last stage by place (by depth, below 0.25 or above 0.9, where a network has no place), and by
depth alone as before. Each plan runs in a worker with a time limit.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from multiprocessing import get_context
from pathlib import Path

from probe_zoo import _init  # the same worker set-up: warnings off, an address-space cap

ZOO = Path(__file__).resolve().parent.parent / "docs" / "results" / "train_zoo.json"
CNN = "resnet18"
# the ViT partner: timm's ViT-Tiny at the family's own size (its position table is built for that size); with
# --stem small its table cannot follow the 32x32 patch grid, so there it is a ViT-Tiny with rotary positions (EVA)
VIT = {"own": "vit_tiny_patch16_224", "small32": "vit_tiny_patch16_dinov3_qkvb"}
LOW, HIGH = 0.25, 0.9


def _plan_one(args) -> dict:
    family, model, partner, setting, size, timeout = args
    import signal

    def _alarm(signum, frame):
        raise TimeoutError(f"over {timeout}s")

    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    start = time.perf_counter()
    result = {"family": family, "model": model, "partner": partner, "setting": setting, "input_size": size}
    try:
        from clcli import probe

        _cache_analyses(probe)
        plan = probe.plan([model, partner], size, stem="small" if setting == "small32" else "imagenet")
        site = plan.sites[0]
        result.update(status="ok", depths=[t.depth for t in site.taps], places=[t.place for t in site.taps],
                      sizes=[list(t.size) for t in site.taps],
                      taps=[t.module or t.node for t in site.taps],
                      pairing=getattr(site, "pairing", "x2" if site.resized else "equal"))
    except BaseException as e:  # noqa: BLE001 - a sweep records every refusal and goes on
        text = str(e).strip().splitlines()
        result.update(status="refused" if type(e).__name__ == "ClcliError" else "error",
                      error=f"{type(e).__name__}: {text[0][:200] if text else ''}")
    finally:
        signal.alarm(0)
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def _cache_analyses(probe) -> None:
    """Analyse each (model, size, stem) once per worker: the partners recur in every family's plans. `plan` calls
    `analyse` through the module, and reads its results without changing them."""
    if getattr(probe.analyse, "cached", False):
        return
    analyse, seen = probe.analyse, {}

    def cached(name, input_size=32, **kwargs):
        key = (name, str(input_size), tuple(sorted(kwargs.items())))
        if key not in seen:
            seen[key] = analyse(name, input_size, **kwargs)
        return seen[key]

    cached.cached = True
    probe.analyse = cached


def _badly_placed(r: dict, i: int) -> tuple[bool, bool]:
    """(in the stem, at the last stage) for network i of a planned pair: by place where it has one, else by depth."""
    place = (r.get("places") or [None, None])[i]
    if place is None:
        return r["depths"][i] < LOW, r["depths"][i] > HIGH
    return place < 0, place >= 1


def summary(results: list[dict]) -> dict:
    """Per setting and partner kind: plans made, how many put a network's site below LOW or above HIGH in depth, and
    how many in its stem or at its last stage by place (`_badly_placed`)."""
    out = {}
    for setting in ("own", "small32"):
        for kind in ("cnn", "vit"):
            rows = [r for r in results if r["setting"] == setting and r["kind"] == kind]
            ok = [r for r in rows if r["status"] == "ok"]
            placed = [(_badly_placed(r, 0), _badly_placed(r, 1)) for r in ok]  # ((stem, last) family, partner)
            out[f"{setting}/{kind}"] = {
                "pairs": len(rows), "planned": len(ok),
                "family_low": sum(r["depths"][0] < LOW for r in ok),
                "family_high": sum(r["depths"][0] > HIGH for r in ok),
                "partner_low": sum(r["depths"][1] < LOW for r in ok),
                "partner_high": sum(r["depths"][1] > HIGH for r in ok),
                "either_outside": sum(any(d < LOW or d > HIGH for d in r["depths"]) for r in ok),
                "family_stem": sum(family[0] for family, _ in placed),
                "family_last": sum(family[1] for family, _ in placed),
                "partner_stem": sum(partner[0] for _, partner in placed),
                "partner_last": sum(partner[1] for _, partner in placed),
                "either_badly_placed": sum(any(family) or any(partner) for family, partner in placed),
                "family_first_stage": sum((r.get("places") or [None])[0] == 0 for r in ok),
                "pairings": {p: sum(r["pairing"] == p for r in ok) for p in sorted({r["pairing"] for r in ok})},
            }
    return out


def markdown(paths: list[str]) -> str:
    """The distribution table of docs/results.md, one column group per file (before, after)."""
    files = [json.loads(Path(p).read_text()) for p in paths]
    head = "| setting / partner | " + " | ".join(f"{f['label']}: planned, below {LOW} / above {HIGH} "
                                                f"(family net), (partner), either" for f in files) + " |"
    lines = [head, "|---|" + "---|" * len(files)]
    for key in files[0]["summary"]:
        cells = []
        for f in files:
            s = f["summary"][key]
            by_place = (f"; by place: stem / last {s['family_stem']} / {s['family_last']}, "
                        f"{s['partner_stem']} / {s['partner_last']}, **{s['either_badly_placed']}**; family net at "
                        f"its first stage past the stem {s['family_first_stage']}") if "family_stem" in s else ""
            cells.append(f"{s['planned']}/{s['pairs']}, {s['family_low']} / {s['family_high']}, "
                         f"{s['partner_low']} / {s['partner_high']}, **{s['either_outside']}**{by_place}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="probe_pairs.json")
    parser.add_argument("--label", default="after", help="what code this measures (before, after)")
    parser.add_argument("--code", default="", help="which commit that is (recorded; default: the clcli path)")
    parser.add_argument("--families", default="", help="comma-separated families (default: all)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=180, help="seconds per plan")
    parser.add_argument("--memory-gib", type=float, default=8.0, help="address-space cap per worker")
    parser.add_argument("--markdown", nargs="+", metavar="JSON", help="print the table of these sweep files")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(args.markdown))
        return

    zoo = json.loads(ZOO.read_text())["families"]
    wanted = [f for f in args.families.split(",") if f] or list(zoo)
    tasks, kinds = [], {}
    for family in wanted:
        entry = zoo[family]
        for setting, size in (("own", entry["own_size"]), ("small32", 32)):
            for kind, partner in (("cnn", CNN), ("vit", VIT[setting])):
                tasks.append((family, entry["model"], partner, setting, size, args.timeout))
                kinds[(family, setting, partner)] = kind
    start = time.perf_counter()
    results = []
    ctx = get_context("spawn")
    with ctx.Pool(args.workers, initializer=_init, initargs=(args.memory_gib,), maxtasksperchild=100) as pool:
        for i, r in enumerate(pool.imap_unordered(_plan_one, tasks), 1):
            r["kind"] = kinds[(r["family"], r["setting"], r["partner"])]
            results.append(r)
            if i % 25 == 0 or i == len(tasks):
                print(f"{i}/{len(tasks)} planned, {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    results.sort(key=lambda r: (r["family"], r["setting"], r["kind"]))
    import clcli

    doc = {"label": args.label, "code": args.code or clcli.__file__, "partners": {"cnn": CNN, "vit": VIT},
           "seconds": round(time.perf_counter() - start, 1), "summary": summary(results), "results": results}
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc["summary"], indent=1))


if __name__ == "__main__":
    main()
