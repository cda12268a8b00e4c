"""Splice modules into a model at graph nodes that are not module outputs (fx rewriting): MKB halves, and the
feature capture of FitNets' hint.

A forward hook can only replace a module's output. A tap such as the residual `add` before a block's activation,
or a `flatten` inside `forward`, has no module to hook. For those, the model is traced with the same fx tracer the
probe uses (so node names match the plan), the half is inserted after its node, and the model's `forward` is
replaced on the instance by the rewritten graph. The GraphModules borrow the model's own submodules, so parameters
are shared and the state_dict keys stay timm's own; nothing is registered under the model beyond `mkb.`.

Two graphs are kept, one traced in train mode and one in eval mode, because fx bakes `self.training` branches
(e.g. `F.dropout(..., training=self.training)`) into the graph as constants.
"""
from __future__ import annotations

import torch
from torch import nn

from clcli.errors import ClcliError, one_line


class HalfAtNode(nn.Module):
    """Runs one MKB half on a node's output, keeps its embedding and returns the fused features."""

    def __init__(self, half: nn.Module):
        super().__init__()
        self.mkb_half = half

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused, self.mkb_half.embedding = self.mkb_half(x)
        return fused


class RewrittenForward:
    """The replacement `forward`: the train-mode or eval-mode graph, whichever matches the model's mode.
    A plain object (not a Module), so the GraphModules are not registered as submodules of the model."""

    def __init__(self, model: nn.Module, graphs: dict[bool, torch.fx.GraphModule]):
        self.model = model
        self.graphs = graphs

    def __call__(self, *args, **kwargs):
        return self.graphs[self.model.training](*args, **kwargs)


def _trace(model: nn.Module, training: bool) -> torch.fx.Graph:
    from clcli.tracing import TimmTracer, concrete_args

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


def splice(model: nn.Module, sites: dict[str, nn.Module], what: str = "an MKB") -> None:
    """Insert `sites` into `model` by fx rewriting: graph node name -> a module applied to that node's output, whose
    result replaces it for every later use. The modules are borrowed, not registered under the model."""
    if isinstance(model.forward, RewrittenForward):
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
        graphs[training] = torch.fx.GraphModule(owners, graph, class_name=f"{type(model).__name__}WithMKB")
    model.forward = RewrittenForward(model, graphs)


def _resolve(model: nn.Module, qualified_name: str):
    obj = model
    for part in qualified_name.split("."):
        obj = getattr(obj, part)
    return obj
