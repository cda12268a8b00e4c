"""Feature-map layouts at a tap: NCHW, NHWC, or NLC (a token grid, optionally after prefix tokens such as a class
token). MKBs and FitNets' regressors work on NCHW; these convert a tap's value there and back."""
from __future__ import annotations

import torch


def to_nchw(x: torch.Tensor, layout: str, prefix_tokens: int, height: int, width: int
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the map as NCHW, the prefix tokens a token grid carried, or None)."""
    if layout == "NCHW":
        return x, None
    if layout == "NHWC":
        return x.permute(0, 3, 1, 2), None
    prefix, tokens = x[:, :prefix_tokens], x[:, prefix_tokens:]
    return tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width), prefix


def from_nchw(y: torch.Tensor, layout: str, prefix: torch.Tensor | None) -> torch.Tensor:
    """The inverse of `to_nchw`: an NCHW map back in `layout`, with its prefix tokens in front."""
    if layout == "NCHW":
        return y
    if layout == "NHWC":
        return y.permute(0, 2, 3, 1)
    return torch.cat([prefix, y.flatten(2).transpose(1, 2)], dim=1)
