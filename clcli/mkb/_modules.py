"""The MKB modules: per-network encoder and decoder, the shared space transfer, and the fusion H = (1 + elu(M)) (+) X."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clcli import layouts

from .spec import FUSIONS, HalfSpec, MKBSpec



class Encoder(nn.Sequential):
    """Feature map (C_i, H_i, W_i) -> unified code (C_code, h, w)."""

    def __init__(self, half: HalfSpec, spec: MKBSpec):
        k, size = half.kernel, (spec.code_height, spec.code_width)
        layers: list[nn.Module] = []
        stride = 1
        if half.resample == "x2" and k == 3:
            stride = 2
        elif half.resample != "none":
            layers.append(nn.AdaptiveAvgPool2d(size))
        layers += [
            nn.Conv2d(half.channels, spec.code_channels, k, stride=stride, padding=k // 2, bias=False),
            nn.BatchNorm2d(spec.code_channels),
            nn.ReLU(inplace=True),
        ]
        super().__init__(*layers)


class SpaceTransfer(nn.Sequential):
    """Two conv layers into the mutual space; the flattened output is the embedding. Shared by all networks."""

    def __init__(self, spec: MKBSpec):
        c = spec.code_channels
        super().__init__(
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
        )


class Decoder(nn.Sequential):
    """Mutual-space code (C_code, h, w) -> M of the network's shape (C_i, H_i, W_i)."""

    def __init__(self, half: HalfSpec, spec: MKBSpec):
        k, c = half.kernel, spec.code_channels
        layers: list[nn.Module]
        if half.resample == "x2" and k == 3:
            layers = [nn.ConvTranspose2d(c, half.channels, 4, stride=2, padding=1, bias=False)]
        else:
            layers = [nn.Conv2d(c, half.channels, k, padding=k // 2, bias=False)]
            if half.resample != "none":
                layers.append(nn.Upsample(size=(half.height, half.width), mode="nearest"))
        norm = nn.BatchNorm2d(half.channels)
        # M = 0 at the start: with mul fusion the MKB is the identity, so it cannot hurt the untrained network.
        nn.init.zeros_(norm.weight)
        layers.append(norm)
        super().__init__(*layers)


class MKBHalf(nn.Module):
    """One network's path through one MKB: its encoder, the (shared) transfer, its decoder, and the fusion back
    into the network. Converts the tap's layout (NCHW, NHWC or a token grid) to NCHW and back."""

    def __init__(self, layout: str, prefix_tokens: int, half: HalfSpec, spec: MKBSpec, transfer: SpaceTransfer,
                 fuse: str = "mul"):
        super().__init__()
        if fuse not in FUSIONS:
            raise ValueError(f"fuse must be one of {FUSIONS}")
        self.layout, self.prefix_tokens, self.fuse = layout, prefix_tokens, fuse
        self.height, self.width = half.height, half.width
        self.encoder = Encoder(half, spec)
        self.transfer = transfer
        self.decoder = Decoder(half, spec)
        # The embedding passes through this identity so that a FeatureRecorder can record it (`mkb.embeddings`).
        self.embedding_point = nn.Identity()

    def fusion_hook(self, module, inputs, output):
        """The forward hook on the tap module: its output replaced by the fused features."""
        return self(output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The tap's features fused with the MKB's output, in the tap's layout."""
        return self.fuse_and_embed(x)[0]

    def fuse_and_embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused features and the embedding in the mutual space [B, E]."""
        features, prefix = layouts.to_nchw(x, self.layout, self.prefix_tokens, self.height, self.width)
        code = self.transfer(self.encoder(features))
        embedding = self.embedding_point(code.flatten(1))
        gate = 1.0 + F.elu(self.decoder(code))
        fused = features * gate if self.fuse == "mul" else features + gate
        return layouts.from_nchw(fused, self.layout, prefix), embedding
