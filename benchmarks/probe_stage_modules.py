"""Stage coverage by module, before and after issue 34's stage-0 fix, on a sample of the timm zoo.

For every k-th model (at its pretrained input size): timm's feature_info stages of 2x2 or more, and whether the probe
offers each (a stage tap of the stage's size at or after the node that ends the stage's module: the counting of
benchmarks/probe_zoo.py), once with the probe's stage taps as they are and once with the rule before the fix (the
outermost module of a size, deepest: a first stage that keeps its stem's size offered the stem).

    python benchmarks/probe_stage_modules.py --every 10 --out docs/results/probe_zoo_every10_stage_modules.json
"""
from __future__ import annotations

import argparse
import json
import resource
import signal
import sys
import warnings
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--out", required=True)
    parser.add_argument("--timeout", type=int, default=120, help="seconds per model")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
    sys.path.insert(0, str(Path(__file__).parent))
    import probe_zoo
    import timm

    from clcli import probe
    from clcli.probe import _taps

    def timeout(signum, frame):
        raise TimeoutError(f"over {args.timeout}s")

    signal.signal(signal.SIGALRM, timeout)
    results = []
    for name in timm.list_models()[:: args.every]:
        signal.alarm(args.timeout)
        try:
            cfg = timm.models.get_pretrained_cfg(name)
            size = tuple(cfg.input_size[-2:]) if cfg is not None and cfg.input_size else (224, 224)
            m = probe.analyse(name, size, num_classes=1000)
            after = probe_zoo._stage_coverage(name, size, m)
            m.stage_taps = _taps.stage_taps(m.taps)  # no stage ends: the rule before the fix
            results.append({"name": name, "before": probe_zoo._stage_coverage(name, size, m), "after": after})
        except BaseException as e:  # noqa: BLE001 - a sample records every failure and goes on
            results.append({"name": name, "error": f"{type(e).__name__}: {str(e)[:120]}"})
        finally:
            signal.alarm(0)
    Path(args.out).write_text(json.dumps(results, indent=1))
    counted = [r for r in results if "before" in r and "sizes" in r["before"]]
    for k in ("before", "after"):
        print(f"{k}: {sum(r[k]['found'] for r in counted)} of {sum(len(r[k]['sizes']) for r in counted)} stages "
              f"offered; {sum(r[k]['found'] == len(r[k]['sizes']) for r in counted)} of {len(counted)} models with "
              f"every stage")


if __name__ == "__main__":
    main()
