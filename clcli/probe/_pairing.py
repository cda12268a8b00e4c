"""Rank candidate MKB sites across models: feature maps of equal spatial size (the paper, section III-B), and each
network's tap as early as its first stage past the stem, never in the stem or at the last stage before the head.
Where the MKB goes was measured (docs/results.md section 5, the site study): on the three pairs where a network
overfits, one MKB at the end of each network's first stage past the stem gave the weaker network the most of any
single site and each later one less (the stronger network gained about the same at every site); on a pair where
both underfit CL helped at no site and cost most there, and the rule stays as the best on average;
the paper's Table 5 (one pair, one seed, CIFAR networks without a stem) put the best at the second of three stages
and the classifier last. Each network's own place counts: a site is as good as the worse placed of its taps, so that
no network's MKB sits at its stem or right before its head to suit the other."""
from __future__ import annotations

import itertools
import math

from ._taps import MIN_SIDE, TARGET_DEPTH, Tap

GOOD_SIDE = 4         # below this the unified code is smaller than the paper's 4x4
EXTREMES = (0.25, 0.9)  # by graph depth (a model without timm stages): the stem, and right before the head
EXTREME_COST = 1.0    # what sitting there costs: more than pairing sizes a ratio of 4 apart
RATIO_COST = 0.4      # per doubling between two taps' sides (an encoder resamples them to one code): more than one
                      # stage of place between two taps of a four-stage network (1/3), so equal sizes win there
SMALL_COST = 1.0      # a map smaller than 4x4
SPLICE_COST = 0.1     # a tap that is not a module output (a graph rewrite instead of a hook)
MAX_RATIO = 8         # sites pair sides at most this far apart
MAX_COMBINATIONS = 20_000
SHOWN = 8             # sites a plan lists besides the chosen ones


def tap_quality(tap: Tap) -> float:
    """How good one network's tap is for an MKB. By its place among timm's stages (`Tap.place`): 1 at the end of the
    first stage past the stem (place 0), falling linearly to 0 at the end of the last; `EXTREME_COST` lower in the
    stem (place < 0) and at the last stage's end (right before the head). A model without timm stages (no
    feature_info) keeps the graph-depth rule of the paper's Table 5, which the site study did not measure."""
    if tap.place is None:
        return depth_quality(tap.depth)
    quality = 1.0 - abs(tap.place)
    if tap.place < 0 or tap.place >= 1:
        quality -= EXTREME_COST
    return quality


def depth_quality(depth: float) -> float:
    """A tap's quality by graph depth alone: 1 at `TARGET_DEPTH`, falling linearly, `EXTREME_COST` lower outside
    `EXTREMES` (Table 5: the middle-to-late stage best, the first and last stages the worst sites)."""
    quality = 1.0 - abs(depth - TARGET_DEPTH)
    if not EXTREMES[0] <= depth <= EXTREMES[1]:
        quality -= EXTREME_COST
    return quality


def _spread(taps: list[Tap]) -> float:
    """log2 of the largest ratio between two taps' sides (0 for equal sizes, 1 for a ratio of 2)."""
    return max(math.log2(max(t.height for t in taps) / min(t.height for t in taps)),
               math.log2(max(t.width for t in taps) / min(t.width for t in taps)))


def _score(taps: list[Tap]) -> float:
    """The worse-placed network's tap quality (a tenth of the mean breaks ties), less the costs of the sizes."""
    qualities = [tap_quality(t) for t in taps]
    score = min(qualities) + 0.1 * sum(qualities) / len(qualities) - RATIO_COST * _spread(taps)
    if min(min(t.height, t.width) for t in taps) < GOOD_SIDE:
        score -= SMALL_COST
    if not all(t.is_module_output for t in taps):
        score -= SPLICE_COST
    return round(score, 4)


def _pairing(taps: list[Tap]) -> str:
    sizes = {t.size for t in taps}
    if len(sizes) == 1:
        return "equal"
    (h, w) = min(sizes)
    return "x2" if sizes <= {(h, w), (2 * h, 2 * w)} else "nearest"


def candidate_sites(per_model: list[list[Tap]]) -> list[dict]:
    """Sites as dicts {size, taps, score, resized, pairing}, best first: every combination of one tap per model
    (maps of 2x2 or more) whose sides are at most a ratio of `MAX_RATIO` apart. `pairing` is "equal" where the sizes
    are equal, "x2" for sizes in a ratio of 2 (bridged by the encoders' stride), else "nearest" (every encoder
    resamples to the one code size); the ratio is part of the score, so an equal size placed badly in one network
    loses to unequal sizes placed well in both. A site is labelled by its smallest sides."""
    usable = [[t for t in taps if min(t.size) >= MIN_SIDE] for taps in per_model]
    if not all(usable):
        return []
    if math.prod(len(u) for u in usable) > MAX_COMBINATIONS:  # many models: each keeps its best tap per size
        usable = [list({t.size: t for t in sorted(u, key=tap_quality)}.values()) for u in usable]
    sites = []
    for combo in itertools.product(*usable):
        taps = list(combo)
        if _spread(taps) > math.log2(MAX_RATIO):
            continue
        pairing = _pairing(taps)
        sites.append({"size": [min(t.height for t in taps), min(t.width for t in taps)], "taps": taps,
                      "resized": pairing != "equal", "pairing": pairing, "score": _score(taps)})
    if not sites:  # no two sizes within the ratio: each model's smallest map, the nearest they come
        taps = [min(u, key=lambda t: (t.height * t.width, -t.depth)) for u in usable]
        sites.append({"size": [min(t.height for t in taps), min(t.width for t in taps)], "taps": taps,
                      "resized": True, "pairing": _pairing(taps), "score": _score(taps)})
    sites.sort(key=lambda s: -s["score"])
    return sites


def spread(sites: list[dict], k: int) -> list[dict]:
    """The best k sites, no two of which share a tap of any network; best first."""
    chosen: list[dict] = []
    used: set[tuple[int, str]] = set()
    for site in sites:
        taps = {(i, t.node) for i, t in enumerate(site["taps"])}
        if taps & used:
            continue
        chosen.append(site)
        used |= taps
        if len(chosen) == k:
            break
    return chosen


def shown(sites: list[dict], chosen: list[dict]) -> list[dict]:
    """The sites a plan lists, best first: the chosen ones, the best site of each of the `SHOWN` best combinations
    of sizes, and the best site of every size all networks share (what `--site 4x4` and `--site all` name), however
    low it scores."""
    out, sizes, equal = [], set(), set()
    for site in sites:
        key = tuple(t.size for t in site["taps"])
        first_equal = site["pairing"] == "equal" and key not in equal
        if any(site is c for c in chosen) or (key not in sizes and len(sizes) < SHOWN) or first_equal:
            out.append(site)
            sizes.add(key)
        if site["pairing"] == "equal":
            equal.add(key)
    return out


def nearest_sizes(per_model: list[list[Tap]]) -> str:
    """Each model's tap sizes, largest first: '32x32, 16x16; 4x4'."""
    return "; ".join(", ".join(f"{h}x{w}" for h, w in sorted({t.size for t in taps}, reverse=True)) or "none"
                     for taps in per_model)
