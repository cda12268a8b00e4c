"""Trace a timm model into a small, uniform graph description (fx first, torch.export as the fallback).

Both tracers end in the same `Graph`: nodes in topological order with their output shape, the module that
produced them (if any) and the modules whose scope they belong to. Everything downstream (taps, stem surgery,
MACs) reads only this description, so it never cares which tracer ran.
"""
from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from clcli.tracing import TimmTracer, concrete_args


@dataclass
class GNode:
    name: str
    op: str                          # placeholder | call_module | call_function | call_method | output
    target: str                      # module path for call_module, function name otherwise
    scope: tuple[str, ...]           # module paths whose forward this node runs inside, outermost first
    shape: tuple[int, ...] | None    # output shape when the output is a single tensor
    tensor: bool = True              # whether the output holds any tensor (False: sizes, ints, None)
    inputs: list[int] = field(default_factory=list)
    users: list[int] = field(default_factory=list)


@dataclass
class Graph:
    nodes: list[GNode]
    tracer: str                      # "fx" or "export"
    macs: int                        # multiply-accumulates of conv and linear layers for one image
    # per module the trace called, the node each call returned (None: no single node, e.g. a list or tuple), i.e.
    # what a forward hook there would see; None where the tracer does not say (torch.export)
    module_returns: dict[str, list[str | None]] | None = None


def _tensor_shape(value) -> tuple[int, ...] | None:
    if isinstance(value, torch.Tensor):
        return tuple(int(s) for s in value.shape)
    return None


def _holds_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    return False


def _link(nodes: list[GNode], index: dict) -> list[GNode]:
    """Fill each node's inputs and users (indices into `nodes`) from the tracer's node objects."""
    for node, i in index.items():
        nodes[i].inputs = sorted({index[a] for a in node.all_input_nodes if a in index})
    for i, n in enumerate(nodes):
        for j in n.inputs:
            nodes[j].users.append(i)
    return nodes


def _fx_graph(model: nn.Module, example: torch.Tensor) -> tuple[list[GNode], dict[str, list[str | None]]]:
    """The graph's nodes, and what each module's calls returned (`Graph.module_returns`)."""
    from torch.fx.passes.shape_prop import ShapeProp

    tracer = TimmTracer()
    returns: dict[str, list[str | None]] = {}
    with _recording_returns(model, returns):
        fx_graph = tracer.trace(model, concrete_args=concrete_args(model))
    gm = torch.fx.GraphModule(tracer.root, fx_graph)
    # ShapeProp prints the traceback of a failing node before raising; the error it raises says it in one line
    with contextlib.redirect_stderr(io.StringIO()):
        ShapeProp(gm).propagate(example)
    nodes: list[GNode] = []
    index: dict[torch.fx.Node, int] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            continue  # weights: constant, never a path for activations
        meta = node.meta.get("tensor_meta")
        shape = tuple(int(s) for s in meta.shape) if hasattr(meta, "shape") else None
        scope = tuple(node.meta.get("nn_module_stack", {}).keys())
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        index[node] = len(nodes)
        # ShapeProp sets tensor_meta only where the value holds a tensor: sizes and ints carry no features
        nodes.append(GNode(node.name, node.op, target, scope, shape, tensor="tensor_meta" in node.meta))
        if node.op == "call_module":  # a leaf module: fx records its call as this node, without entering it
            returns.setdefault(node.target, []).append(node.name)
    return _link(nodes, index), returns


@contextlib.contextmanager
def _recording_returns(model: nn.Module, returns: dict[str, list[str | None]]):
    """While fx traces `model`, a forward hook on each module records the node each call returns: the probe learns
    where a hook sees exactly one tap from the trace itself, with no second forward on the meta device."""
    def record(path: str):
        def hook(module, args, output):
            returns.setdefault(path, []).append(output.node.name if isinstance(output, torch.fx.Proxy) else None)
        return hook

    handles = [module.register_forward_hook(record(path)) for path, module in model.named_modules() if path]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


_EXPORT_PATH = re.compile(r"\[(\d+)\]")


def _export_scope_path(path: str) -> str:
    """torch.export writes scopes as `L['self'].blocks[0].attn` or `blocks.0.attn`; make them module paths."""
    path = path.replace("L['self']", "").replace("L__self__", "")
    path = _EXPORT_PATH.sub(r".\1", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = path.replace("getattr(", "").replace(")", "")
    return path.strip(".")


def _export_graph(model: nn.Module, example: torch.Tensor) -> list[GNode]:
    program = torch.export.export(model, (example,), strict=False)
    user_inputs = set(program.graph_signature.user_inputs)
    nodes: list[GNode] = []
    index: dict = {}
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name not in user_inputs:
            continue  # lifted parameters and buffers
        stack = node.meta.get("nn_module_stack", {}) or {}
        scope = tuple(p for p in (_export_scope_path(v[0]) for v in stack.values()) if p)
        target = node.target if isinstance(node.target, str) else str(node.target)
        index[node] = len(nodes)
        value = node.meta.get("val")
        nodes.append(GNode(node.name, node.op, target, scope, _tensor_shape(value), tensor=_holds_tensor(value)))
    return _link(nodes, index)


def _count_macs(model: nn.Module, nodes: list[GNode]) -> int:
    """Conv and linear MACs per image, from each layer's output shape (attention matmuls are not counted)."""
    modules = dict(model.named_modules())
    total = 0
    for n in nodes:
        if n.shape is None or not n.shape:
            continue
        per_image = 1
        for s in n.shape[1:]:
            per_image *= s
        if n.op == "call_module":
            path = n.target
        elif n.op == "call_function" and n.scope and ("conv" in n.target or "linear" in n.target):
            path = n.scope[-1]  # torch.export: the aten op runs inside the layer's module scope
        else:
            continue
        m = modules.get(path)
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1]
            total += per_image * (m.in_channels // m.groups) * k
        elif isinstance(m, nn.Linear):
            total += per_image * m.in_features
    return total


def _eager_error(model: nn.Module, example: torch.Tensor) -> Exception | None:
    try:
        with torch.no_grad():
            model(example)
    except Exception as e:  # noqa: BLE001 - what the model itself says about this input
        # on the meta device a data-dependent op fails whatever the size: that says nothing about the input
        return None if "meta" in str(e).lower() else e
    return None


def trace(model: nn.Module, example: torch.Tensor, export: bool = True) -> Graph:
    """Trace `model` (in eval mode) on `example`, with fx and, where fx fails (and `export`), torch.export."""
    from clcli.errors import ClcliError, one_line

    model.eval()
    returns = None
    try:
        nodes, returns = _fx_graph(model, example)
        tracer = "fx"
    except Exception as fx_error:  # noqa: BLE001 - any tracing failure falls back to export
        # before torch.export, which takes minutes to fail on a model that cannot run this input at all
        eager_error = _eager_error(model, example)
        if eager_error is not None:  # not a tracing problem: the model refuses this input size
            from clcli.models import input_size_error

            cfg = getattr(model, "pretrained_cfg", None) or {}
            raise input_size_error(cfg.get("architecture") or type(model).__name__, example.shape[-2:],
                                   eager_error, made_for=cfg.get("input_size"),
                                   context=" by itself, without tracing") from None
        try:
            if not export:
                raise RuntimeError("not tried")
            nodes = _export_graph(model, example)
        except Exception as export_error:  # noqa: BLE001
            raise ClcliError(
                f"cannot analyse {type(model).__name__}: fx failed ({one_line(fx_error)}) and torch.export "
                f"failed ({one_line(export_error)})"
            ) from None
        tracer = "export"
    return Graph(nodes, tracer, _count_macs(model, nodes), returns)
