"""Where can MKBs go? Trace timm models, find their tap points and rank sites where all of them meet.

Public API: `analyse(name, ...)` for one model, `plan(names, ...)` for a cohort; `Plan.to_dict()` is what
`clcli probe --json` prints and `clcli train --plan` reads.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from clcli.errors import ClcliError
from clcli.mkb.spec import EMBEDDING, MKBSpec, size_mkb
from clcli.models import STEMS, StemChange

from ._taps import MIN_SIDE, Tap, has_site

# 2: a model's taps may hold several of one size (an isotropic trunk's depths), any spatial size is a tap, and a
# site's score is its worse-placed network's (docs/probe.md). 3: a tap's `place` counts from the first stage past
# the stem and the score reads it (the site study, docs/results.md section 5). Older plans read the same and train
# as written.
PLAN_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)


@dataclass
class ModelProbe:
    name: str
    kwargs: dict
    stem: StemChange | None
    tracer: str                  # fx | export
    params: int
    macs: int
    taps: list[Tap]              # every spatial cut point
    stage_taps: list[Tap]        # what sites may use: a stage output per size, several depths of an isotropic trunk
    notes: list[str] = field(default_factory=list)  # what the user should know about this model at this input
    # timm's feature_info stages in order: (module, the graph node that ends it or None, that node's depth, its
    # reduction of the input); not in the plan file (a plan keeps the taps chosen), read by the zoo's stage coverage
    feature_stages: list[tuple[str, str | None, float | None, int | None]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kwargs": self.kwargs,
            "stem": self.stem.to_dict() if self.stem else None,
            "tracer": self.tracer,
            "params": self.params,
            "macs": self.macs,
            "taps": [t.to_dict() for t in self.stage_taps],
            "notes": self.notes,
        }


@dataclass
class Site:
    size: tuple[int, int]
    taps: list[Tap]              # one per model, in model order
    score: float
    resized: bool
    mkb: MKBSpec
    pairing: str = "equal"       # equal | x2 (sizes in a ratio of 2) | nearest (each model's nearest size)

    def to_dict(self) -> dict:
        return {
            "size": list(self.size),
            "score": self.score,
            "resized": self.resized,
            "pairing": self.pairing,
            "taps": [t.to_dict() for t in self.taps],
            "mkb": self.mkb.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Site":
        return cls(tuple(d["size"]), [Tap(**t) for t in d["taps"]], d["score"], d["resized"],
                   MKBSpec.from_dict(d["mkb"]), d.get("pairing", "x2" if d["resized"] else "equal"))


@dataclass
class Plan:
    models: list[ModelProbe]
    input_size: tuple[int, int]
    stem: str
    sites: list[Site]            # chosen sites (what training builds)
    candidates: list[Site] = field(default_factory=list)  # every ranked site
    resized: bool = False
    version: int = PLAN_VERSION

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "input_size": list(self.input_size),
            "stem": self.stem,
            "models": [m.to_dict() for m in self.models],
            "sites": [s.to_dict() for s in self.sites],
            "candidates": [s.to_dict() for s in self.candidates],
            "notes": self.notes,
        }

    @property
    def notes(self) -> list[str]:
        """What a user should know about how the sites pair the models (the table prints them too)."""
        pairings = {s.pairing for s in self.sites}
        notes = []
        if "x2" in pairings:
            notes.append("no equal spatial size sits well in every network (past the stem, before the last stage): "
                         "sites pair sizes in a ratio of 2, bridged by a resize")
        if "nearest" in pairings:
            sizes = "; ".join(" / ".join(f"{t.height}x{t.width}" for t in s.taps) for s in self.sites
                              if s.pairing == "nearest")
            notes.append(f"no equal spatial size or one in a ratio of 2 sits well in every network (past the stem, "
                         f"before the last stage): sites pair each model's nearest size ({sizes}), every encoder "
                         f"resampling to the one code size")
        return notes

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if not isinstance(d, dict) or "version" not in d:
            raise ClcliError("not a clcli plan (no 'version' field)")
        if d["version"] not in READABLE_VERSIONS:
            raise ClcliError(f"unsupported plan version {d['version']} (this clcli reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))})")
        try:
            models = [
                ModelProbe(m["name"], m["kwargs"], StemChange(**m["stem"]) if m["stem"] else None, m["tracer"],
                           m["params"], m["macs"], [Tap(**t) for t in m["taps"]], [Tap(**t) for t in m["taps"]],
                           list(m.get("notes", [])))
                for m in d["models"]
            ]
            if not all(isinstance(m.name, str) for m in models):
                raise TypeError("a model name is not a string")
            sites = [Site.from_dict(s) for s in d["sites"]]
            candidates = [Site.from_dict(s) for s in d.get("candidates", [])]
            return cls(models, tuple(d["input_size"]), d["stem"], sites, candidates,
                       any(s.resized for s in sites), d["version"])
        except (KeyError, TypeError) as e:
            raise ClcliError(f"malformed clcli plan: {e}") from None

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]


def _as_hw(input_size) -> tuple[int, int]:
    hw = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if len(hw) != 2 or any((not isinstance(x, int)) or x < 8 or x > 4096 for x in hw):
        raise ClcliError(f"bad input size {input_size}: give one integer (or H, W) between 8 and 4096")
    return hw  # type: ignore[return-value]


def _traced(model, in_chans: int, hw: tuple[int, int], export: bool = True, *, build_real=None):
    """(model, graph): shapes on the meta device (no memory, no compute); where a meta kernel is missing, a model
    built for real by `build_real()`. Not the meta model moved with `to_empty`: its integer buffers (relative
    position indices) would hold whatever memory held, and a model be refused for garbage, not its real limit.
    A model already on the CPU is traced as it is."""
    import torch

    from ._graph import trace

    if _on_meta(model):
        try:
            return model, trace(model, torch.empty(1, in_chans, *hw, device="meta"), export)
        except ClcliError:
            if build_real is None:
                raise
            model = build_real()
    return model, trace(model, torch.zeros(1, in_chans, *hw), export)


def _on_meta(model) -> bool:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor is None or tensor.device.type == "meta"


def _hookable(model, taps: list[Tap], graph, in_chans: int, hw: tuple[int, int]) -> list[Tap]:
    """Keep a tap's module only where a forward hook there sees exactly the tap: the module runs once per forward
    and returns one tensor of the tap's shape. A block that returns `[x, skip]` or `(x, cls_token)`, or a module
    called at several places, is spliced in by its graph node instead (`clcli.tracing.splice`). The fx trace says
    what each module's calls returned; a graph from torch.export does not, so that model runs once more, hooked."""
    import dataclasses

    paths = {t.module for t in taps if t.module}
    if not paths:
        return taps
    if graph.module_returns is not None:
        shapes = {n.name: n.shape for n in graph.nodes}
        seen = {p: [shapes.get(node) for node in graph.module_returns.get(p, [])] for p in paths}
    else:
        seen = _hooked_forward(model, paths, in_chans, hw)

    def batch1(t: Tap) -> tuple:
        return (1, t.channels, t.height, t.width) if t.layout == "NCHW" else \
            (1, t.height, t.width, t.channels) if t.layout == "NHWC" else \
            (1, t.prefix_tokens + t.height * t.width, t.channels)

    return [t if t.module is None or seen[t.module] == [batch1(t)] else
            dataclasses.replace(t, module=None, is_module_output=False) for t in taps]


def _hooked_forward(model, paths: set[str], in_chans: int, hw: tuple[int, int]) -> dict[str, list]:
    """The output shape of each call of each module in `paths` (None: not one tensor) in one forward."""
    import torch

    seen: dict[str, list] = {p: [] for p in paths}
    handles = [model.get_submodule(p).register_forward_hook(
        lambda m, i, out, p=p: seen[p].append(tuple(out.shape) if isinstance(out, torch.Tensor) else None))
        for p in paths]
    try:
        with torch.no_grad():
            model(torch.empty(1, in_chans, *hw, device="meta") if _on_meta(model)
                  else torch.zeros(1, in_chans, *hw, device=next(model.parameters()).device))
    except Exception:  # noqa: BLE001 - a model that only the tracer can run: its hooks cannot be checked either
        seen = {p: [] for p in paths}
    finally:
        for h in handles:
            h.remove()
    return seen


def analyse(
    name: str,
    input_size: int | tuple[int, int] = 32,
    *,
    stem: str = "imagenet",
    num_classes: int = 10,
    in_chans: int = 3,
) -> ModelProbe:
    """Trace one timm model and find its taps."""
    from clcli import models

    from ._stem import find_small_stem
    from ._taps import stage_taps

    if stem not in STEMS:
        raise ClcliError(f"unknown stem '{stem}': use one of {', '.join(STEMS)}")
    hw = _as_hw(input_size)
    kwargs = models.model_kwargs(name, num_classes=num_classes, in_chans=in_chans, input_size=hw)
    model = models.create(name, kwargs, meta=True)
    change = None
    if stem == "small":
        model, graph = _stem_graph(model, in_chans, hw, build_real=lambda: models.create(name, kwargs))
        change = find_small_stem(model, graph)
        if change.conv is None and change.pool is None:
            raise ClcliError(f"{name}: no strided conv or pooling found for --stem small ({_no_stem_reason(model)}); "
                             f"use --stem imagenet")
        models.apply_stem(model, change)
        try:
            # torch.export only where fx needed it before the change: it takes minutes to fail on a broken model
            model, graph = _traced(model, in_chans, hw, export=graph.tracer == "export",
                                   build_real=lambda: models.create(name, kwargs, stem=change))
        except ClcliError as e:
            raise ClcliError(f"{name}: --stem small breaks the model ({e}); use --stem imagenet") from None
    else:
        model, graph = _traced(model, in_chans, hw, build_real=lambda: models.create(name, kwargs))
    stages = _feature_stages(model, graph)
    taps = _placed(_module_taps(model, graph, in_chans, hw), stages)
    return ModelProbe(name, kwargs, change, graph.tracer, models.count_params(model), graph.macs,
                      taps, stage_taps(taps, {node for _, node, _, _ in stages if node}), _patch_notes(name, model, hw),
                      stages)


# feature_info stages that downsample the input by at most this much belong to the stem: resnet's act1, regnet's
# stem, mobilenet's bn1, efficientnet's blocks.0 (one depthwise block at stride 2), dla's level0-1
STEM_REDUCTION = 2


def _placed(taps: list[Tap], stages: list[tuple[str, str | None, float | None, int | None]]) -> list[Tap]:
    """Each tap's place among timm's stages past the stem: 0 at the end of the first stage past the stem (the first
    feature_info stage that reduces the input more than `STEM_REDUCTION`), 1 at the end of the last, k / (n - 1) at the
    end of the k-th after it, in proportion to graph depth in between, 1 after the last end. The stem's stages lie
    below 0 on the same scale (resnet's act1 at -1/3), a tap before the first stage end one step below that. A ViT's
    blocks (all at reduction 16) count from blocks.0."""
    import bisect
    import dataclasses

    ends = sorted((depth, reduction) for _, _, depth, reduction in stages if depth is not None)
    depths = [d for d, _ in ends]
    stem = next((k for k, (_, r) in enumerate(ends) if r is None or r > STEM_REDUCTION), 0)
    span = len(ends) - 1 - stem
    if span < 1:
        return taps

    def place(depth: float) -> float:
        k = bisect.bisect_left(depths, depth)  # the first stage end at or after the tap
        if k == len(depths):
            return 1.0
        if k == 0:  # the first stage end itself, or the step below it
            inside = 1.0 if depth == depths[0] else 0.0
        else:
            inside = (depth - depths[k - 1]) / max(depths[k] - depths[k - 1], 1e-9)
        return round((k - 1 - stem + inside) / span, 4)

    return [dataclasses.replace(t, place=place(t.depth)) for t in taps]


def _feature_stages(model, graph) -> list[tuple[str, str | None, float | None, int | None]]:
    """timm's own stages (the model's public `feature_info`): each module with the graph node that ends it (the last
    node run in its scope), that node's depth (None where the graph has no such scope) and the stage's reduction of
    the input (None where feature_info gives none)."""
    info = getattr(model, "feature_info", None)
    if not isinstance(info, list):
        return []
    last: dict[str, int] = {}
    for i, n in enumerate(graph.nodes):
        for path in n.scope:
            last[path] = i
        if n.op == "call_module":
            last[n.target] = i
    output_pos = max(len(graph.nodes) - 1, 1)
    stages = []
    for entry in info:
        module = entry.get("module") if isinstance(entry, dict) else None
        if isinstance(module, str):
            i = last.get(module)
            reduction = entry.get("reduction")
            stages.append((module, None if i is None else graph.nodes[i].name,
                           None if i is None else round(i / output_pos, 4),
                           reduction if isinstance(reduction, int) else None))
    return stages


def _stem_graph(model, in_chans: int, hw: tuple[int, int], *, build_real=None):
    """The graph the stem is found in: at `hw`, or where the model fails there as built (Inception's valid
    convolutions leave nothing of a 32 px input before the small stem keeps it large), at its own input size."""
    try:
        return _traced(model, in_chans, hw, build_real=build_real)
    except ClcliError as at_size:
        own = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size") or ())[-2:]
        if len(own) != 2 or own == tuple(hw):
            raise
        try:
            return _traced(model, in_chans, own, export=False, build_real=build_real)
        except ClcliError:
            raise at_size from None


def _no_stem_reason(model) -> str:
    """Why a model has nothing for --stem small to change, as far as its modules show."""
    from torch import nn

    kinds = {type(m).__name__ for m in model.modules()}
    if "SpaceToDepth" in kinds:
        return "its stem folds 4x4 pixels into channels (space-to-depth), so a stride cannot change"
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return "it embeds patches with a linear layer, not a strided conv"
    return "its downsampling is not a strided conv or pooling"


def _module_taps(model, graph, in_chans: int, hw: tuple[int, int]) -> list[Tap]:
    """The taps of a traced model, each hooked at its module where a hook sees exactly the tap."""
    from ._taps import find_taps_in_graph

    prefix = getattr(model, "num_prefix_tokens", None)
    return _hookable(model, find_taps_in_graph(graph, hw, prefix if isinstance(prefix, int) else None), graph,
                     in_chans, hw)


def _patch_notes(name: str, model, hw: tuple[int, int]) -> list[str]:
    """A patch embedding (ViT) floors the input to whole patches: say so when the input is not a multiple of them."""
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    stride = getattr(proj, "stride", None)
    if not stride or all(side % step == 0 for side, step in zip(hw, stride)):
        return []
    grid = [side // step for side, step in zip(hw, stride)]
    cut = [side % step for side, step in zip(hw, stride)]
    return [f"{name}: {hw[0]}x{hw[1]} px is not a multiple of its {stride[0]}x{stride[1]} px patches; its token grid "
            f"is {grid[0]}x{grid[1]} (the last {cut[0]} rows and {cut[1]} columns of pixels are not seen)"]


def plan(
    names: list[str],
    input_size: int | tuple[int, int] = 32,
    *,
    stem: str = "imagenet",
    mkbs: int = 1,
    num_classes: int = 10,
    in_chans: int = 3,
    embedding: int = EMBEDDING,
    budget: float = 0.10,
    sites: list[int | str] | None = None,
) -> Plan:
    """Probe every model and choose `mkbs` MKB sites common to all of them, the best ones; or, with `sites`, the
    listed sites they name (a number: 1 = the first of `Plan.candidates`, the probe table's numbers with the same
    arguments; a map size such as '4x4'; 'all'), as many as they name."""
    from clcli.models import check_model_name

    from ._pairing import candidate_sites, nearest_sizes, shown, spread

    if len(names) < 2:
        raise ClcliError("collaborative learning needs at least 2 models")
    if mkbs < 1:
        raise ClcliError(f"--mkbs must be at least 1, got {mkbs}")
    for n in names:
        check_model_name(n)
    hw = _as_hw(input_size)
    probes = [analyse(n, hw, stem=stem, num_classes=num_classes, in_chans=in_chans) for n in names]
    raw = candidate_sites([p.stage_taps for p in probes])
    if not raw:
        bare = [p.name for p in probes if not has_site(p.stage_taps)]
        raise ClcliError(
            f"no MKB site at input {hw[0]}x{hw[1]}: {', '.join(bare)} has no feature map of {MIN_SIDE}x{MIN_SIDE} or "
            f"larger (stage sizes: {nearest_sizes([p.stage_taps for p in probes])}); try a larger --input-size"
            + (" or --stem small" if stem != "small" else "")
        )
    chosen_raw = spread(raw, mkbs)
    if len(chosen_raw) < mkbs:
        raise ClcliError(f"asked for {mkbs} MKBs but only {len(chosen_raw)} sites share no tap")
    params = [p.params for p in probes]
    by_id = {id(s): Site(tuple(s["size"]), s["taps"], s["score"], s["resized"],
                         size_mkb([(t.channels, t.height, t.width) for t in s["taps"]], params,
                                  embedding=embedding, budget=budget), s["pairing"])
             for s in shown(raw, chosen_raw)}
    listed = list(by_id.values())
    chosen = [by_id[id(s)] for s in chosen_raw] if not sites else _numbered(listed, sites, names)
    return Plan(probes, hw, stem, chosen, listed, any(s.resized for s in chosen))


def _numbered(listed: list[Site], specs: list[int | str], names: list[str]) -> list[Site]:
    """The listed sites these specs name: a 1-based number, a map size ('4x4': the best listed site where every
    network has a map of that size) or 'all' (every such size); two sites may not share a tap (one MKB per feature
    map)."""
    numbers = []
    equal = equal_sizes(listed)
    how = f"`clcli probe {' '.join(names)}` with the same input size and stem lists them"
    for spec in specs:
        spec = int(spec) if isinstance(spec, str) and spec.isdigit() else spec
        if spec == "all":
            numbers += list(equal.values())
        elif isinstance(spec, str):
            if spec not in equal:
                raise ClcliError(f"site {spec}: these models do not meet at {spec}; they meet at "
                                 f"{', '.join(equal) or 'no equal size'} ({how})")
            numbers.append(equal[spec])
        else:
            numbers.append(spec)
    bad = [n for n in numbers if not 1 <= n <= len(listed)]
    if bad:
        raise ClcliError(f"site {bad[0]} is not listed: the probe lists sites 1 to {len(listed)} for these models "
                         f"({how})")
    for i, a in enumerate(numbers):
        for b in numbers[i + 1:]:
            shared = [(name, t.module or t.node) for name, t, u in zip(names, listed[a - 1].taps, listed[b - 1].taps)
                      if t.node == u.node]
            if shared:
                raise ClcliError(f"sites {a} and {b} share {shared[0][0]}'s tap {shared[0][1]}; choose sites on "
                                 f"different feature maps")
    return [listed[n - 1] for n in numbers]


def equal_sizes(listed: list[Site]) -> dict[str, int]:
    """Each map size where every network has a tap of that size ('4x4') -> the number of its best listed site,
    largest size first."""
    best: dict[str, int] = {}
    for number, site in enumerate(listed, 1):
        if site.pairing == "equal":
            best.setdefault(f"{site.size[0]}x{site.size[1]}", number)
    return dict(sorted(best.items(), key=lambda kv: -int(kv[0].split("x")[0])))


__all__ = ["Plan", "Site", "ModelProbe", "Tap", "analyse", "plan", "equal_sizes", "PLAN_VERSION", "has_site"]
