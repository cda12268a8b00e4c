"""Tap points: cut points of the graph whose output is a spatial feature map.

A cut point is a node that every path from the input to the head goes through: no edge jumps over it. Inside a
residual block the skip edge jumps over every node, so only the block output qualifies, which is exactly where an
MKB can rewrite the features without breaking the block.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ._graph import GNode, Graph

MIN_SIDE = 2  # an MKB site's smallest side: a 1x1 map is a pooled vector (the paper found the fc position worst)


def has_site(taps) -> bool:
    """Whether some tap is large enough for an MKB."""
    return any(min(t.size) >= MIN_SIDE for t in taps)


@dataclass
class Tap:
    node: str                 # graph node name
    module: str | None        # module path whose forward output is this tensor (hookable), else None
    layout: str               # NCHW | NHWC | NLC (token grid)
    channels: int
    height: int
    width: int
    prefix_tokens: int        # NLC only: class/register tokens before the patch grid
    stage: int                # downsampling level: round(log2(input_height / height))
    depth: float              # 0 = input, 1 = head, by position in the graph
    is_module_output: bool

    @property
    def size(self) -> tuple[int, int]:
        return (self.height, self.width)

    def to_dict(self) -> dict:
        return asdict(self)


def cut_points(nodes: list[GNode]) -> list[int]:
    """Indices of nodes over which no edge jumps (reach of all earlier nodes ends at or before them)."""
    cuts = []
    reach = -1
    for i, n in enumerate(nodes):
        if reach <= i and n.op not in ("placeholder", "output"):
            cuts.append(i)
        last_use = max(n.users) if n.users else i
        reach = max(reach, last_use)
    return cuts


def stream_cuts(nodes: list[GNode]) -> list[int]:
    """Cut points of one stream, for models with no plain cut point at a feature map: nodes over which only values
    jump that are not their own features: values that hold no tensor (a `B, C, H, W = x.shape` read at a block's
    start and used at its end) and values that are not ancestors of the node (a class token carried beside the
    patch grid, as in PiT and CoaT; the other scale's tokens in CrossViT). A residual skip is an ancestor of every
    node inside its block, so block interiors stay excluded."""
    ancestors: list[int] = []   # bit j set: node j is an ancestor
    live: dict[int, int] = {}   # node -> index of its last use
    learned = [n.op == "call_module" for n in nodes]  # a layer ran on the way here: features, not the image
    cuts = []
    for i, n in enumerate(nodes):
        mine = 0
        for j in n.inputs:
            mine |= ancestors[j] | (1 << j)
            learned[i] = learned[i] or learned[j]
        ancestors.append(mine)
        live = {j: last for j, last in live.items() if last > i}
        if learned[i] and n.op not in ("placeholder", "output") and all(
                not nodes[j].tensor or not (mine >> j) & 1 for j in live):
            cuts.append(i)
        if n.users:
            live[i] = max(n.users)
    return cuts


def _scale_level(size: int, full: int) -> int | None:
    """Level k with size ~ full / 2**k (floor or ceil, the usual conv arithmetic), or None."""
    for k in range(0, 8):
        exact = full / (2**k)
        if size in (math.floor(exact), math.ceil(exact)) and size >= 1:
            return k
    return None


def _any_level(size: int, full: int) -> int | None:
    """Level k with size nearest full / 2**k, for any size up to the input's (PiT's 27 = (224 - 16) / 8 + 1,
    Sequencer's 32 = 224 / 7)."""
    return round(math.log2(full / size)) if 2 <= size <= full else None


def _same_level(level, h: int, w: int, input_hw: tuple[int, int], strict: bool) -> bool:
    H, W = input_hw
    k = level(h, H)
    if k is None or k != level(w, W):
        return False
    return strict or abs(h * W - w * H) <= max(H, W)  # any size: the input's aspect ratio, to a pixel


def _layout(shape: tuple[int, ...], input_hw: tuple[int, int], prefix_hint: int | None, prefer: str | None,
            strict: bool = True):
    """(layout, C, H, W, prefix) for a spatial feature map, or None. Spatial dims must look like input / 2**k
    (`strict`), or be any size up to the input's with its aspect ratio."""
    level = _scale_level if strict else _any_level
    if len(shape) == 4:
        _, a, b, c = shape
        # Both spatial dims must come from the same number of downsamplings (a square input stays square).
        nchw = _same_level(level, b, c, input_hw, strict)
        nhwc = _same_level(level, a, b, input_hw, strict)
        if nchw and nhwc:
            use = prefer or "NCHW"  # C == H == W: a model keeps one layout, so follow its other taps
        elif nchw:
            use = "NCHW"
        elif nhwc:
            use = "NHWC"
        else:
            return None
        return (use, a, b, c, 0) if use == "NCHW" else (use, c, a, b, 0)
    if len(shape) == 3:
        _, length, channels = shape
        prefixes = [prefix_hint] if prefix_hint is not None else range(0, 9)
        for p in prefixes:
            grid = _patch_grid(length - p, input_hw)
            if grid is None:
                continue
            if (prefix_hint is None and p > 0 or not strict) and _patch_grid(channels, input_hw) is not None:
                # A guessed prefix (or any stream cut) while the last dim is itself a patch grid: channels-first
                # tokens (B, C, H*W), e.g. LeViT's or PiT's flatten, not a token grid.
                return None
            return ("NLC", channels, grid[0], grid[1], p)
        return None
    return None


def _patch_grid(tokens: int, input_hw: tuple[int, int]) -> tuple[int, int] | None:
    """(h, w) when `tokens` patches tile the input: h = floor(H / patch), w = floor(W / patch) (a patch embedding
    drops the remainder, e.g. 384 px with 14 px patches gives 27 x 27)."""
    H, W = input_hw
    if tokens < 4:
        return None
    for patch in range(1, max(H, W) + 1):
        h, w = H // patch, W // patch
        if h * w == tokens:
            return (h, w)
        if h * w < tokens:
            return None
    return None


def _module_output(nodes: list[GNode], i: int, last_in_scope: dict[str, int]) -> str | None:
    """The outermost module whose forward returns node i: node i is the last node run inside its scope."""
    n = nodes[i]
    paths = list(n.scope)
    if n.op == "call_module" and n.target not in paths:
        paths.append(n.target)
    for path in paths:  # outermost first
        if "@" in path:
            continue  # fx marks a module's second and later calls `path@k`: a hook would fire at every call
        if last_in_scope.get(path) == i:
            return path
    return None


def find_taps_in_graph(graph: Graph, input_hw: tuple[int, int], prefix_hint: int | None = None) -> list[Tap]:
    """Taps at plain cut points with sizes input / 2**k; for a model with none of 2 x 2 or more (token streams beside
    a class token, multi-scale streams, maps of other sizes), taps at stream cut points of any size (`stream_cuts`)."""
    strict = _find_taps(graph, input_hw, prefix_hint, strict=True)
    if has_site(strict):
        return strict
    # Only pooled maps at input / 2**k sizes, e.g. ConvMixer's 7-pixel patches: 32 x 32 maps at 224 px.
    return _without_channels_first_tokens(_find_taps(graph, input_hw, prefix_hint, strict=False)) or strict


def _without_channels_first_tokens(taps: list[Tap]) -> list[Tap]:
    """Drop 'token grids' that are a feature map flattened channels first, (B, C, H*W): L equals the channels and C
    the positions of a map the model also has (PiT's flatten of its 27 x 27 map before the transpose)."""
    maps = {(t.channels, t.height * t.width) for t in taps if t.layout != "NLC"}
    return [t for t in taps if not (t.layout == "NLC" and t.prefix_tokens == 0
                                    and (t.height * t.width, t.channels) in maps)]


def _flattened_channels_first(n: GNode, nodes: list[GNode]) -> bool:
    """Whether a 3-d node is a feature map flattened channels first, (B, C, H, W) -> (B, C, H*W), as its input shows:
    the flatten before the transpose to tokens (LeViT, PiT, class-token models), not a token grid. Read from the
    shapes alone it can pass for one (C = 32 tokens as 7 class tokens + a 5 x 5 grid of H*W = 49 channels)."""
    if n.shape is None or len(n.shape) != 3:
        return False
    _, length, last = n.shape
    return any(s is not None and len(s) == 4 and s[1] == length and s[2] * s[3] == last
               for s in (nodes[j].shape for j in n.inputs))


def _find_taps(graph: Graph, input_hw: tuple[int, int], prefix_hint: int | None, strict: bool) -> list[Tap]:
    nodes = graph.nodes
    last_in_scope: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for path in n.scope:
            last_in_scope[path] = i
        if n.op == "call_module":
            last_in_scope[n.target] = i
    output_pos = max(len(nodes) - 1, 1)
    taps: list[Tap] = []
    prefer = None
    for i in (cut_points(nodes) if strict else stream_cuts(nodes)):
        n = nodes[i]
        if n.shape is None or _flattened_channels_first(n, nodes):
            continue
        found = _layout(n.shape, input_hw, prefix_hint, prefer, strict)
        if found is None:
            continue
        layout, c, h, w, prefix = found
        if layout != "NLC":
            prefer = layout
        module = _module_output(nodes, i, last_in_scope)
        taps.append(
            Tap(
                node=n.name,
                module=module,
                layout=layout,
                channels=c,
                height=h,
                width=w,
                prefix_tokens=prefix,
                stage=0,  # set below, once every size is known
                depth=round(i / output_pos, 4),
                is_module_output=module is not None,
            )
        )
    stages = _stage_labels({t.height for t in taps}, input_hw[0])
    for t in taps:
        t.stage = stages[t.height]
    return taps


def _stage_labels(heights: set[int], input_height: int) -> dict[int, int]:
    """A downsampling level per spatial size, one label per size: k where the size is input / 2**k (floor or ceil,
    as conv arithmetic gives it; 33 px -> 17, 9, 5, 3 are levels 1 to 4), else round(log2(input / size)) (a patch
    grid), raised where needed so that a smaller size always has a higher level."""
    labels, previous = {}, -1
    for h in sorted(heights, reverse=True):
        level = _scale_level(h, input_height)
        if level is None:
            level = round(math.log2(max(input_height / h, 1.0)))
        labels[h] = previous = max(level, previous + 1)
    return labels


TARGET_DEPTH = 0.65   # middle-to-late: Table 5's best site sits about two thirds of the way to the head
ISOTROPIC_SPAN = 0.3  # a size that spans this much of the depth is an isotropic trunk (ViT), not one stage


def _path_depth(t: Tap) -> int:
    return t.module.count(".") if t.module else 99


def stage_taps(taps: list[Tap]) -> list[Tap]:
    """One tap per spatial size. In a CNN stage: the stage output, i.e. the outermost module (fewest path parts)
    and, among those, the deepest. In an isotropic trunk (ViT, one size for most of the depth): the block output
    nearest the paper's middle-to-late target depth."""
    by_size: dict[tuple[int, int], list[Tap]] = {}
    for t in taps:
        by_size.setdefault(t.size, []).append(t)
    chosen = []
    for group in by_size.values():
        candidates = [t for t in group if t.is_module_output] or group
        span = max(t.depth for t in candidates) - min(t.depth for t in candidates)
        if span > ISOTROPIC_SPAN:
            chosen.append(min(candidates, key=lambda t: abs(t.depth - TARGET_DEPTH)))
        else:
            chosen.append(min(candidates, key=lambda t: (_path_depth(t), -t.depth)))
    return sorted(chosen, key=lambda t: t.depth)
