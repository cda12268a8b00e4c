"""Rank candidate MKB sites across models, following the paper (section III-B, Table 5): feature maps of equal
spatial size, convolutional stages rather than the classifier, later stages preferred with the middle-to-late
stage best (conv2_x of three stages in Table 5)."""
from __future__ import annotations

from ._taps import TARGET_DEPTH, Tap

MIN_SIDE = 2          # a 1x1 map is a pooled vector: the paper found the fc position worst
GOOD_SIDE = 4         # below this the unified code is smaller than the paper's 4x4


def _score(taps: list[Tap]) -> float:
    depth = sum(t.depth for t in taps) / len(taps)
    score = 1.0 - abs(depth - TARGET_DEPTH)
    if min(min(t.height, t.width) for t in taps) < GOOD_SIDE:
        score -= 1.0
    if not all(t.is_module_output for t in taps):
        score -= 0.25  # a hook is simpler and cheaper than rewriting the graph
    return round(score, 4)


def candidate_sites(per_model: list[list[Tap]]) -> tuple[list[dict], bool]:
    """Sites as dicts {size, taps, score, resized}, best first; `resized` is True when no equal size exists and the
    sites pair sizes in a ratio of 2 (bridged by the encoders' pooling / stride)."""
    sizes = [{t.size: t for t in taps if min(t.size) >= MIN_SIDE} for taps in per_model]
    common = set(sizes[0]).intersection(*sizes[1:])
    sites = [
        {"size": list(s), "taps": [m[s] for m in sizes], "resized": False} for s in sorted(common)
    ]
    resized = not sites
    if resized:
        # Every model contributes a tap at a base size or at twice it, so that no two taps of a site are more than a
        # ratio of 2 apart; each site is labelled by its base (the smaller) size.
        for base in sorted(set().union(*sizes)):
            double = (2 * base[0], 2 * base[1])
            picks = []
            for m in sizes:
                match = [m[x] for x in (base, double) if x in m]
                if not match:
                    break
                picks.append(max(match, key=lambda t: t.depth))
            else:
                sites.append({"size": list(base), "taps": picks, "resized": True})
    for site in sites:
        site["score"] = _score(site["taps"])
    sites.sort(key=lambda s: -s["score"])
    return sites, resized


def spread(sites: list[dict], k: int) -> list[dict]:
    """The best k sites, each at a different stage (size) of the first model; best first."""
    chosen: list[dict] = []
    used: set[tuple[int, ...]] = set()
    for site in sites:
        stages = tuple(t.stage for t in site["taps"])
        if stages in used:
            continue
        chosen.append(site)
        used.add(stages)
        if len(chosen) == k:
            break
    return chosen


def nearest_sizes(per_model: list[list[Tap]]) -> str:
    return "; ".join(
        ", ".join(f"{t.height}x{t.width}" for t in taps) or "none" for taps in per_model
    )
