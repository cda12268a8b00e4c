"""Rank candidate MKB sites across models, following the paper (section III-B, Table 5): feature maps of equal
spatial size, convolutional stages rather than the classifier, later stages preferred with the middle-to-late
stage best (conv2_x of three stages in Table 5)."""
from __future__ import annotations

import math

from ._taps import MIN_SIDE, TARGET_DEPTH, Tap

GOOD_SIDE = 4         # below this the unified code is smaller than the paper's 4x4


def _spread(taps: list[Tap]) -> float:
    """log2 of the largest ratio between two taps' sides (0 for equal sizes, 1 for a ratio of 2)."""
    return max(math.log2(max(t.height for t in taps) / min(t.height for t in taps)),
               math.log2(max(t.width for t in taps) / min(t.width for t in taps)))


def _score(taps: list[Tap]) -> float:
    depth = sum(t.depth for t in taps) / len(taps)
    score = 1.0 - abs(depth - TARGET_DEPTH)
    if _spread(taps) > 1:
        score -= 0.5 * (_spread(taps) - 1)  # nearest sizes further apart than 2: more is lost in the resampling
    if min(min(t.height, t.width) for t in taps) < GOOD_SIDE:
        score -= 1.0
    if not all(t.is_module_output for t in taps):
        score -= 0.25  # a hook is simpler and cheaper than rewriting the graph
    return round(score, 4)


def candidate_sites(per_model: list[list[Tap]]) -> tuple[list[dict], bool]:
    """Sites as dicts {size, taps, score, resized, pairing}, best first. `pairing` is "equal" where the models share
    spatial sizes; else "x2": sizes in a ratio of 2 (bridged by the encoders' pooling / stride); else "nearest": each
    model's nearest size (a patch-14 ViT's 16x16 against a CNN's 14x14), every encoder resampling to the one code
    size. `resized` is True when the sites are not of equal sizes."""
    sizes = [{t.size: t for t in taps if min(t.size) >= MIN_SIDE} for taps in per_model]
    common = set(sizes[0]).intersection(*sizes[1:])
    sites = [
        {"size": list(s), "taps": [m[s] for m in sizes], "resized": False, "pairing": "equal"} for s in sorted(common)
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
                sites.append({"size": list(base), "taps": picks, "resized": True, "pairing": "x2"})
    if not sites and all(sizes):
        # Each model's size nearest to each size any model has (in log scale); one site per distinct combination,
        # labelled by its smallest sides (the code is no larger than them).
        seen = set()
        for base in sorted(set().union(*sizes)):
            picks = [min(m.values(), key=lambda t: (abs(math.log2(t.height / base[0])) +
                                                   abs(math.log2(t.width / base[1])), -t.depth)) for m in sizes]
            key = tuple(t.node for t in picks)
            if key not in seen:
                seen.add(key)
                size = [min(t.height for t in picks), min(t.width for t in picks)]
                sites.append({"size": size, "taps": picks, "resized": True, "pairing": "nearest"})
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
