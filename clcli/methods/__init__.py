"""Training methods. Each is one small file that supplies its losses; all share one training loop.

A method is an `nn.Module` in the style of timm's training tasks: `forward(batch) -> dict` with `loss` (what the
loop back-propagates), `logits` (one tensor per network) and `parts` (every loss term, for logging).
"""
from __future__ import annotations

from ._base import METHODS, NOT_TRAINED, Batch, Method, create, get, register, uses_mkb

# Importing the method files registers them.
from . import cl, il  # noqa: E402,F401
from . import dml, fitnets, kd, mkb_solo, wel  # noqa: E402,F401

__all__ = ["METHODS", "NOT_TRAINED", "Method", "Batch", "create", "get", "register",
           "uses_mkb"]
