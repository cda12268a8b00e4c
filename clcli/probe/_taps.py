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
    # where the tap sits among the stages timm's feature_info names: 0 = in the first, 1 = in the last (None: the
    # model has no feature_info, or a plan written before this field)
    place: float | None = None

    @property
    def size(self) -> tuple[int, int]:
        return (self.height, self.width)

    def to_dict(self) -> dict:
        return asdict(self)


def image_features(nodes: list[GNode]) -> list[bool]:
    """Per node, whether its value carries features of the image: a tensor computed from the input through tensors.
    A `B, C, H, W = x.shape` read, and whatever is computed from it alone (a rotary position table, an attention
    mask), does not: it is the same for every image of that size."""
    carries: list[bool] = []
    for n in nodes:
        carries.append(n.tensor and (n.op == "placeholder" or any(carries[j] for j in n.inputs)))
    return carries


def cut_points(nodes: list[GNode], features_only: bool = False) -> list[int]:
    """Indices of nodes over which no edge jumps (reach of all earlier nodes ends at or before them). With
    `features_only`, values that carry no image features (`image_features`) may jump: a `B, H, W` read from a shape
    at a network's start and used in every stage's reshape (Twins, PVT), a rotary position table used by every block
    (EVA); rewriting a map keeps its shape and changes none of them."""
    carries = image_features(nodes) if features_only else [True] * len(nodes)
    cuts = []
    reach = -1
    for i, n in enumerate(nodes):
        if reach <= i and n.op not in ("placeholder", "output"):
            cuts.append(i)
        if carries[i]:
            reach = max(reach, max(n.users) if n.users else i)
    return cuts


def stream_cuts(nodes: list[GNode]) -> list[int]:
    """Cut points of one stream: nodes over which only values jump that are not their own features: values that
    carry no image features (`image_features`: a `B, C, H, W = x.shape` read at a block's start and used at its end,
    a rotary position table) and values that are not ancestors of the node (a class token carried beside the patch
    grid, as in PiT and CoaT; the other scale's tokens in CrossViT; a parallel branch, as in HRNet). A residual skip
    is an ancestor of every node inside its block, so block interiors stay excluded."""
    carries = image_features(nodes)
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
                not carries[j] or not (mine >> j) & 1 for j in live):
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


def _spatial(h: int, w: int, input_hw: tuple[int, int]) -> bool:
    """Whether (h, w) can be a feature map of the input: any size up to the input's (valid convolutions, odd strides,
    7-pixel patches: Inception's 147, 71, 35, 17, 8 at 299 px, ConvMixer's 32 at 224) with the input's aspect ratio,
    to a pixel of the input."""
    H, W = input_hw
    return 1 <= h <= H and 1 <= w <= W and abs(h * W - w * H) <= max(H, W)


def _layout(shape: tuple[int, ...], input_hw: tuple[int, int], prefix_hint: int | None, prefer: str | None,
            stream: bool = False):
    """(layout, C, H, W, prefix) for a spatial feature map, or None. At a stream cut (`stream`) a token grid whose
    prefix is 0 must not have a last dim that is itself a patch grid (a (B, C, H*W) flatten)."""
    if len(shape) == 4:
        _, a, b, c = shape
        nchw = _spatial(b, c, input_hw)
        nhwc = _spatial(a, b, input_hw)
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
        # a model's declared class tokens may join the grid only after its trunk (CaiT, XCiT, TNT): its blocks
        # carry none
        prefixes = [prefix_hint, 0] if prefix_hint else [0] if prefix_hint == 0 else range(0, 9)
        for p in prefixes:
            grid = _patch_grid(length - p, input_hw)
            if grid is None:
                continue
            if (prefix_hint is None and p > 0 or stream) and _patch_grid(channels, input_hw) is not None:
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
    """Taps at cut points (`cut_points`; values with no image features may jump) and at stream cut points (`stream_cuts`:
    stages that meet only through parallel branches, as HRNet's 28 and 14 px streams; a class token carried beside
    the grid, as in PiT and CoaT; multi-scale streams, as in CrossViT), of any spatial size with the input's aspect
    ratio."""
    cuts = cut_points(graph.nodes, features_only=True)
    taps = _find_taps(graph, input_hw, prefix_hint, cuts)
    streams = _without_channels_first_tokens(_find_taps(
        graph, input_hw, prefix_hint, sorted(set(stream_cuts(graph.nodes)) - set(cuts)), stream=True))
    taps = sorted(taps + streams, key=lambda t: t.depth)
    stages = _stage_labels({t.height for t in taps}, input_hw[0])
    for t in taps:
        t.stage = stages[t.height]
    return taps


def _without_channels_first_tokens(taps: list[Tap]) -> list[Tap]:
    """Drop 'token grids' that are a feature map flattened channels first, (B, C, H*W): L equals the channels and C
    the positions of a map the model also has (PiT's flatten of its 27 x 27 map before the transpose)."""
    maps = {(t.channels, t.height * t.width) for t in taps if t.layout != "NLC"}
    return [t for t in taps if not (t.layout == "NLC" and t.prefix_tokens == 0
                                    and (t.height * t.width, t.channels) in maps)]


def _flattened_channels_first(n: GNode, nodes: list[GNode]) -> bool:
    """Whether a 3-d node is a feature map flattened channels first, (B, C, H*W), as a neighbour shows: made from a
    (B, C, H, W) map (the flatten before the transpose to tokens: LeViT, PiT, class-token models) or made into one
    (Twins' and PVT's transpose of (B, N, C) tokens before the view back to a map), not a token grid. Read from the
    shapes alone it can pass for one (C = 32 tokens as 7 class tokens + a 5 x 5 grid of H*W = 49 channels)."""
    if n.shape is None or len(n.shape) != 3:
        return False
    _, length, last = n.shape
    if any(s is not None and len(s) == 4 and s[1] == length and s[2] * s[3] == last
           for s in (nodes[j].shape for j in (*n.inputs, *n.users))):
        return True
    # a concat of such flattens along the channels (B, C1 + C2, H*W), one step back
    return n.target == "cat" and any(
        nodes[j].shape is not None and len(nodes[j].shape) == 3 and nodes[j].shape[2] == last and any(
            s is not None and len(s) == 4 and s[1] == nodes[j].shape[1] and s[2] * s[3] == last
            for s in (nodes[k].shape for k in nodes[j].inputs)) for j in n.inputs)


def _find_taps(graph: Graph, input_hw: tuple[int, int], prefix_hint: int | None, at: list[int],
               stream: bool = False) -> list[Tap]:
    nodes = graph.nodes
    last_in_scope: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for path in n.scope:
            last_in_scope[path] = i
        if n.op == "call_module":
            last_in_scope[n.target] = i
    output_pos = max(len(nodes) - 1, 1)
    carries = image_features(nodes)
    taps: list[Tap] = []
    prefer = None
    for i in at:
        n = nodes[i]
        if n.shape is None or not carries[i] or n.shape[0] != 1 or _flattened_channels_first(n, nodes):
            # a position grid built from the input's size is no feature map, nor is a batch of windows or of
            # patches (Swin's windows, TNT's pixels within each patch): the probe's image is a batch of one
            continue
        found = _layout(n.shape, input_hw, prefix_hint, prefer, stream)
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
                stage=0,  # set by the caller, once every size is known
                depth=round(i / output_pos, 4),
                is_module_output=module is not None,
            )
        )
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
TRUNK_DEPTHS = (0.5, TARGET_DEPTH, 0.8)  # an isotropic trunk offers its block outputs nearest these depths


def _path_depth(t: Tap) -> int:
    return t.module.count(".") if t.module else 99


def stage_taps(taps: list[Tap], stage_ends: set[str] = frozenset()) -> list[Tap]:
    """The taps a site may use. In a CNN stage (one size over a short stretch of the depth): the stage output, i.e.
    the end of a stage timm's `feature_info` names (`stage_ends`: graph nodes; the deepest of a size, so that a first
    stage that keeps its stem's size offers `stages.0`, not `stem`), else the outermost module (fewest path parts)
    and, among those, the deepest. In an isotropic trunk (ViT, one size for most of the depth): the block outputs
    nearest each of `TRUNK_DEPTHS`, so that pairing can place the MKB at a depth of its own rather than at the one
    output a stage would give, and the stage's own end where timm names one stage of that size."""
    by_size: dict[tuple[int, int], list[Tap]] = {}
    for t in taps:
        by_size.setdefault(t.size, []).append(t)
    chosen = []
    for group in by_size.values():
        candidates = [t for t in group if t.is_module_output] or group
        span = max(t.depth for t in candidates) - min(t.depth for t in candidates)
        if span > ISOTROPIC_SPAN:
            # block outputs: modules of a container (`blocks.7`), not a layer inside a block (`blocks.4.0.bn2`);
            # else the outermost modules (Inception's `Mixed_6c`, not `Mixed_6c.branch_pool.conv`)
            blocks = [t for t in candidates if t.module and t.module.rsplit(".", 1)[-1].isdigit()] or \
                [t for t in candidates if _path_depth(t) == min(map(_path_depth, candidates))]
            nearest = {min(blocks, key=lambda t: abs(t.depth - d)).node: d for d in TRUNK_DEPTHS}
            # and the stage's own end where timm names one stage of this size (a CNN's long stage); a ViT's
            # feature_info names every block, the depths above already are some of them
            ends = [t.node for t in candidates if t.node in stage_ends]
            chosen += [t for t in candidates if t.node in nearest or len(ends) == 1 and t.node in ends]
        else:
            own = [t for t in group if t.node in stage_ends]
            own = [t for t in own if t.is_module_output] or own
            chosen.append(max(own, key=lambda t: t.depth) if own else
                          min(candidates, key=lambda t: (_path_depth(t), -t.depth)))
    return sorted(chosen, key=lambda t: t.depth)
