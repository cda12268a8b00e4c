"""fx tracing of timm models the way timm traces them (its no-trace modules and functions), shared by the probe
(which reads the graph) and MKB / FitNets graph splicing (which rewrites it)."""
from __future__ import annotations

import inspect

import torch
from torch import nn


def _leaf_modules() -> tuple[type, ...]:
    from timm.layers import get_notrace_modules

    return tuple(m for m in get_notrace_modules() if isinstance(m, type))


def _autowrap_functions() -> tuple:
    from timm.layers import get_notrace_functions

    return tuple(f for f in get_notrace_functions() if callable(f))


class TimmTracer(torch.fx.Tracer):
    """fx tracer with timm's own no-trace modules and functions (what `timm.models.get_graph_node_names` uses)."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=_autowrap_functions())
        self._leaves = _leaf_modules()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def concrete_args(model: nn.Module) -> dict:
    """Fix every optional forward argument to its default, so fx takes the plain inference branch
    (hiera's `mask=None` otherwise sends fx down the masking path)."""
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    return {
        p.name: p.default
        for p in params
        if p.default is not inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
