"""Mutual Knowledge Bases and how they attach to timm models.

`attach(model, halves)` registers the network's MKB halves under one prefix (`mkb.`) and hooks each into its tap
module with a forward hook that returns the fused features; where a tap is not a module output, the model's graph
is rewritten with fx instead (`clcli.tracing.splice`). A FeatureRecorder records each half's embedding
(`embeddings`). Either way timm's classes are not edited and the base model's
state_dict keys stay timm's own. `build_cohort_mkbs(plan, ...)` builds, for every site of a plan, one shared space
transfer and each network's half around it.
"""
from __future__ import annotations

from dataclasses import dataclass

from clcli.errors import ClcliError

from .spec import EMBEDDING, FUSIONS, HalfSpec, MKBSpec, size_mkb

PREFIX = "mkb"


def is_shared(qualified_name: str) -> bool:
    """Whether a parameter or buffer name belongs to a space transfer, which the networks of a cohort share (so it is
    optimised, checkpointed and synchronised once, not per network)."""
    return ".transfer." in qualified_name


def site_name(index: int) -> str:
    return f"site{index}"


@dataclass
class HalfPlan:
    """Everything needed to rebuild one network's half at one site (stored in exports)."""

    site: str
    module: str | None           # hookable module path; None when the tap is only a graph node
    layout: str
    prefix_tokens: int
    half: HalfSpec
    spec: MKBSpec
    fuse: str
    node: str | None = None      # fx graph node name of the tap (what fx rewriting splices after)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {"site": self.site, "module": self.module, "layout": self.layout,
                "prefix_tokens": self.prefix_tokens, "half": asdict(self.half), "spec": self.spec.to_dict(),
                "fuse": self.fuse, "node": self.node}

    @classmethod
    def from_dict(cls, d: dict) -> "HalfPlan":
        return cls(d["site"], d["module"], d["layout"], d["prefix_tokens"], HalfSpec(**d["half"]),
                   MKBSpec.from_dict(d["spec"]), d["fuse"], d.get("node"))


def half_plans(plan, network: int, fuse: str) -> list[HalfPlan]:
    """The halves of network `network` for every chosen site of a probe plan."""
    out = []
    for i, site in enumerate(plan.sites):
        tap = site.taps[network]
        out.append(HalfPlan(site_name(i), tap.module, tap.layout, tap.prefix_tokens, site.mkb.halves[network],
                            site.mkb, fuse, tap.node))
    return out


def attach(model, halves: list[HalfPlan], transfers: dict | None = None) -> list:
    """Attach MKB halves to `model` (under `model.mkb`) and hook them in. `transfers` maps site name to a shared
    SpaceTransfer; missing ones are created (a single network, e.g. in an export). Returns the hook handles."""
    import torch.nn as nn

    from clcli.features import FeatureRecorder, output_module
    from clcli.tracing import splice

    from ._modules import MKBHalf, SpaceTransfer

    if hasattr(model, PREFIX):
        raise ClcliError(f"model already has an attribute '{PREFIX}': MKBs are attached once")
    transfers = transfers if transfers is not None else {}
    container = nn.ModuleDict()
    handles = []
    for hp in halves:
        transfer = transfers.setdefault(hp.site, SpaceTransfer(hp.spec))
        half = MKBHalf(hp.layout, hp.prefix_tokens, hp.half, hp.spec, transfer, hp.fuse)
        container[hp.site] = half
    model.add_module(PREFIX, container)
    recorder = FeatureRecorder()
    for site, half in container.items():
        recorder.output_of(site, half.embedding_point)
    container.recorder = recorder  # a plain attribute: no state, not a submodule
    if any(hp.module is None for hp in halves):
        # Graph rewriting replaces forward, which runs non-leaf modules inline, so their hooks would never fire:
        # then every half of this model is spliced in by node.
        missing = [hp.site for hp in halves if hp.node is None]
        if missing:
            raise ClcliError(f"MKB {missing[0]} has neither a module nor a graph node to attach to")
        splice(model, {hp.node: container[hp.site] for hp in halves}, what="an MKB")
        return handles
    for hp in halves:
        try:
            target = model.get_submodule(hp.module)
        except AttributeError:
            raise ClcliError(f"{type(model).__name__} has no module '{hp.module}' for MKB {hp.site}") from None
        # A bound method, not a closure: a deep copy of the model (an EMA copy) gets hooks bound to its own halves.
        handles.append(output_module(target).register_forward_hook(container[hp.site].fusion_hook))
    return handles


def init_gates(model, scale: float) -> None:
    """Start every MKB half of `model` with gate 1 + elu(scale * BN(.)): the weight of each decoder's last
    BatchNorm. 0 (the default at construction) makes M = 0, so a mul-fused MKB starts as the identity."""
    import torch.nn as nn

    for half in getattr(model, PREFIX, {}).values():
        nn.init.constant_(half.decoder[-1].weight, scale)


def embeddings(model) -> dict:
    """The embeddings of the model's last forward, by site name."""
    container = getattr(model, PREFIX, None)
    if container is None:
        return {}
    return {name: container.recorder[name] for name in container}


__all__ = ["attach", "half_plans", "embeddings", "init_gates", "HalfPlan", "MKBSpec", "HalfSpec",
           "size_mkb", "PREFIX", "EMBEDDING", "FUSIONS", "site_name", "is_shared"]
