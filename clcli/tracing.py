"""fx tracing of timm models the way timm traces them (its no-trace modules and functions), shared by the probe
(which reads the graph) and `splice` (which rewrites it).

`splice` inserts modules after graph nodes that are not module outputs. A forward hook can only replace a module's
output; a tap such as the residual `add` before a block's activation, or a `flatten` inside `forward`, has no module
to hook. There the model is traced with the probe's tracer (so node names match the plan), each module is inserted
after its node, and the model's `forward` is replaced on the instance by the rewritten graph. The GraphModules borrow
the model's own submodules, so parameters are shared and the state_dict keys stay timm's own. MKB halves
(`clcli.mkb.attach`) and feature recording at a node (`clcli.features.FeatureRecorder`) both go through it.

Two graphs are kept, one traced in train mode and one in eval mode, because fx bakes `self.training` branches
(e.g. `F.dropout(..., training=self.training)`) into the graph as constants.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from clcli.errors import ClcliError, one_line


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


class RewrittenForward:
    """The replacement `forward`: the train-mode or eval-mode graph, whichever matches the model's mode.
    A plain object (not a Module), so the GraphModules are not registered as submodules of the model."""

    def __init__(self, model: nn.Module, graphs: dict[bool, torch.fx.GraphModule]):
        self.model = model
        self.graphs = graphs

    def __call__(self, *args, **kwargs):
        return self.graphs[self.model.training](*args, **kwargs)


def _trace(model: nn.Module, training: bool) -> torch.fx.Graph:
    was_training = model.training
    model.train(training)
    try:
        return TimmTracer().trace(model, concrete_args=concrete_args(model))
    except Exception as e:  # noqa: BLE001 - any fx failure is one line for the user
        raise ClcliError(f"{type(model).__name__}: fx cannot trace this model to splice into a graph node "
                         f"({one_line(e)}); choose a site whose tap is a module output (clcli probe lists them)"
                         ) from None
    finally:
        model.train(was_training)


def is_spliced(model: nn.Module) -> bool:
    """Whether `splice` has replaced the model's forward with a rewritten graph."""
    return isinstance(model.forward, RewrittenForward)


def splice(model: nn.Module, sites: dict[str, nn.Module], what: str) -> None:
    """Insert `sites` into `model` by fx rewriting: graph node name -> a module applied to that node's output, whose
    result replaces it for every later use. The modules are borrowed, not registered under the model."""
    if is_spliced(model):
        raise ClcliError(f"{type(model).__name__}: graph nodes can be spliced into a model only once")
    graphs = {}
    for training in (True, False):
        graph = _trace(model, training)
        by_name = {n.name: n for n in graph.nodes}
        owners: dict[str, object] = {}  # qualified name -> object; the GraphModule borrows, never copies
        for node_name, module in sites.items():
            node = by_name.get(node_name)
            if node is None:
                raise ClcliError(f"{type(model).__name__} has no graph node '{node_name}' "
                                 f"({'train' if training else 'eval'} mode) to splice {what} into")
            target = f"clcli_splice_{node_name}"
            owners[target] = module
            with graph.inserting_after(node):
                fused = graph.call_module(target, (node,))
            node.replace_all_uses_with(fused, delete_user_cb=lambda user, f=fused: user is not f)
        for node in graph.nodes:
            if node.op in ("call_module", "get_attr") and node.target not in owners:
                owners[node.target] = _resolve(model, node.target)
        graph.lint()
        graphs[training] = torch.fx.GraphModule(owners, graph, class_name=f"{type(model).__name__}Spliced")
    model.forward = RewrittenForward(model, graphs)


def _resolve(model: nn.Module, qualified_name: str):
    obj = model
    for part in qualified_name.split("."):
        obj = getattr(obj, part)
    return obj
