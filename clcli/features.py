"""Recording intermediate features of a forward pass, the one way clcli reads inside a network (after
torchdistill's forward-hook manager and MMRazor's recorders): the MKB embeddings CL compares, the FitNets hint, the
pooled features WEL embeds.

A `FeatureRecorder` keeps, under a key of the caller's choice, what one place of a network produced in the last
forward: a module's output (`output_of`), a module's input (`input_of`), or a graph node's output where no module
produces it (`at_nodes`, by fx splicing a pass-through; `clcli.tracing.splice`). Reading `recorder[key]` gives the
tensor of the last forward, still part of the autograd graph.
"""
from __future__ import annotations

from typing import Any, Hashable

from torch import nn

from clcli.errors import ClcliError


def output_module(module: nn.Module) -> nn.Module:
    """The innermost module whose output is `module`'s: a plain nn.Sequential returns its last child's output. Hooks
    go there because timm's gradient checkpointing (`checkpoint_seq(..., flatten=True)`) runs a stage's blocks one by
    one and never calls the stage itself, whose hooks would silently not fire."""
    while type(module) is nn.Sequential and len(module):
        module = module[-1]
    return module


def input_module(module: nn.Module) -> nn.Module:
    """The innermost module whose input is `module`'s: a plain nn.Sequential's first child (see `output_module`)."""
    while type(module) is nn.Sequential and len(module):
        module = module[0]
    return module


class _PassThrough(nn.Module):
    """Spliced in after a graph node: records the node's output and returns it unchanged."""

    def __init__(self, recorder: "FeatureRecorder", key: Hashable):
        super().__init__()
        self.recorder, self.key = recorder, key

    def forward(self, x):
        self.recorder.values[self.key] = x
        return x


class _Store:
    """A recording hook: a small object, not a closure, so that a deep copy of a hooked model (an EMA copy) records
    into a copy of the recorder, never into the live one."""

    def __init__(self, recorder: "FeatureRecorder", key: Hashable, what: str):
        self.recorder, self.key, self.what = recorder, key, what

    def __call__(self, module, *args):
        # forward hook: (inputs, output); forward pre-hook: (inputs,)
        self.recorder.values[self.key] = args[-1] if self.what == "output" else args[0][0]


class FeatureRecorder:
    def __init__(self) -> None:
        self.values: dict[Hashable, Any] = {}
        self._handles: list = []

    def output_of(self, key: Hashable, module: nn.Module) -> None:
        """Record `module`'s output under `key`."""
        self._handles.append(output_module(module).register_forward_hook(_Store(self, key, "output")))

    def input_of(self, key: Hashable, module: nn.Module) -> None:
        """Record `module`'s first positional input under `key`."""
        self._handles.append(input_module(module).register_forward_pre_hook(_Store(self, key, "input")))

    def at_nodes(self, model: nn.Module, keys_by_node: dict[str, Hashable], what: str) -> None:
        """Record the outputs of `model`'s graph nodes (fx node name -> key): for taps that no module outputs, such
        as a residual add. A model's graph is spliced once, so all of its nodes come in one call."""
        from clcli.tracing import splice

        splice(model, {node: _PassThrough(self, key) for node, key in keys_by_node.items()}, what=what)

    def at_tap(self, key: Hashable, model: nn.Module, module: str | None, node: str | None, what: str) -> None:
        """Record a probe tap of `model`: its module's output when it has one, else its graph node's output."""
        if module is not None:
            self.output_of(key, model.get_submodule(module))
        elif node is not None:
            self.at_nodes(model, {node: key}, what)
        else:
            raise ClcliError(f"{what}: the tap has neither a module nor a graph node")

    def __deepcopy__(self, memo):
        """A copy of a hooked model (an EMA copy) records into a fresh recorder: nothing of the last forward (whose
        tensors may be part of an autograd graph, which deepcopy refuses), no handles to the original's hooks."""
        copy = FeatureRecorder()
        memo[id(self)] = copy
        return copy

    def __getitem__(self, key: Hashable):
        try:
            return self.values[key]
        except KeyError:
            raise KeyError(f"nothing recorded under {key!r}: has the network run forward since the recorder was "
                           f"set up?") from None

    def remove(self) -> None:
        """Remove the hooks (spliced graph nodes stay: a model's graph is not un-spliced)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
