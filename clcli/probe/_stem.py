"""Find the small-stem change from the traced graph, for any family: the first strided conv, and the first
pooling that runs before the next strided layer (the stem's max-pool)."""
from __future__ import annotations

from torch import nn

from clcli.models import StemChange

from ._graph import Graph

_POOLS = (nn.MaxPool2d, nn.AvgPool2d)


def _stride(m: nn.Module) -> int:
    s = getattr(m, "stride", 1)
    s = s if isinstance(s, (tuple, list)) else (s, s)
    return max(int(x) for x in s) if s else 1


def find_small_stem(model: nn.Module, graph: Graph) -> StemChange:
    modules = dict(model.named_modules())
    change = StemChange()
    for n in graph.nodes:
        if n.op != "call_module":
            continue
        m = modules.get(n.target)
        if change.conv is None:
            if isinstance(m, nn.Conv2d) and _stride(m) > 1:
                change.conv = n.target
            continue
        if isinstance(m, _POOLS) and _stride(m) > 1:
            change.pool = n.target
            break
        if isinstance(m, nn.Conv2d) and _stride(m) > 1:
            break  # past the stem: the next downsampling belongs to the body
    return change
