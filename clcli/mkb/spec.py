"""The MKB sizing rule, in plain Python so that `clcli probe` can show sizes without building modules.

For a site joining N feature maps (C_i, H_i, W_i):
- unified code (C_code, h, w): h = min(min_i H_i, 4), w = min(min_i W_i, 4), and C_code = embedding / (h * w) with
  the paper's embedding of 1024 values (64 x 4 x 4), rounded to a multiple of 8;
- resample per network: "none" when (H_i, W_i) = (h, w), "x2" when it is (2h, 2w), else "adaptive";
- encoder i: conv k x k C_i -> C_code (stride 2 for "x2" with k = 3; an average pool to (h, w) first otherwise),
  BN, ReLU;
- space transfer (one, shared): conv3x3 C_code -> C_code, BN, ReLU, conv3x3, BN; flatten = the embedding;
- decoder i: ConvTranspose 4x4 stride 2 for "x2" with k = 3, else conv k x k then a nearest upsample to
  (H_i, W_i); C_code -> C_i, then BN whose weight starts at 0 so that M = 0 and the MKB starts as the identity
  (mul fusion);
- verification: one linear classifier embedding -> classes per site (training only).
k starts at 3 (the paper's 3x3 layers). If one network's half (encoder + transfer + decoder) exceeds `budget`
(default 10 %) of the smallest network's parameters, k drops to 1 first (keeping the paper's embedding size), then
C_code is halved (down to 8) until it fits; the plan reports the embedding and whether the budget was met.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

FUSIONS = ("mul", "add")  # how the decoded gate meets the tap features: multiplied, or added

EMBEDDING = 1024
MAX_CODE_SIDE = 4
MIN_CODE_CHANNELS = 8


@dataclass
class HalfSpec:
    """One network's share of an MKB: its encoder and decoder around the shared transfer."""

    channels: int
    height: int
    width: int
    resample: str           # "none" | "x2" | "adaptive"
    kernel: int             # 3 or 1, for the encoder and the decoder
    params: int             # encoder + shared transfer + decoder
    macs: int               # per image
    fraction: float = 0.0   # params / this network's parameters


@dataclass
class MKBSpec:
    code_channels: int
    code_height: int
    code_width: int
    transfer_params: int
    halves: list[HalfSpec] = field(default_factory=list)
    budget: float = 0.10
    within_budget: bool = True

    @property
    def embedding(self) -> int:
        return self.code_channels * self.code_height * self.code_width

    def to_dict(self) -> dict:
        d = asdict(self)
        d["embedding"] = self.embedding
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MKBSpec":
        d = {k: v for k, v in d.items() if k != "embedding"}
        d["halves"] = [HalfSpec(**h) for h in d.get("halves", [])]
        return cls(**d)


def _conv_bn(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + 2 * cout  # conv without bias, BN weight and bias


def resample_kind(H: int, W: int, h: int, w: int) -> str:
    if (H, W) == (h, w):
        return "none"
    if (H, W) == (2 * h, 2 * w):
        return "x2"
    return "adaptive"


def _half(c: int, H: int, W: int, ch: int, h: int, w: int, k: int, transfer: tuple[int, int]) -> HalfSpec:
    resample = resample_kind(H, W, h, w)
    enc_params, enc_macs = _conv_bn(c, ch, k), c * ch * k * k * h * w
    if resample == "x2" and k == 3:
        dec_params, dec_macs = _conv_bn(ch, c, 4), ch * c * 4 * H * W  # stride-2 deconv: 2x2 taps per output
    else:
        dec_params, dec_macs = _conv_bn(ch, c, k), ch * c * k * k * h * w
    return HalfSpec(c, H, W, resample, k, enc_params + transfer[0] + dec_params, enc_macs + transfer[1] + dec_macs)


def size_mkb(
    maps: list[tuple[int, int, int]],
    network_params: list[int],
    *,
    embedding: int = EMBEDDING,
    budget: float = 0.10,
) -> MKBSpec:
    """Apply the sizing rule to feature maps [(C, H, W), ...] of the networks joined at one site."""
    h = min(MAX_CODE_SIDE, min(H for _, H, _ in maps))
    w = min(MAX_CODE_SIDE, min(W for _, _, W in maps))
    ch = max(MIN_CODE_CHANNELS, int(round(embedding / (h * w) / 8)) * 8)
    limit = budget * min(network_params) if network_params else float("inf")
    k = 3
    while True:
        transfer = (2 * _conv_bn(ch, ch, 3), 2 * ch * ch * 9 * h * w)
        halves = [_half(c, H, W, ch, h, w, k, transfer) for c, H, W in maps]
        fits = max(x.params for x in halves) <= limit
        if fits or (k == 1 and ch <= MIN_CODE_CHANNELS):
            break
        if k == 3:
            k = 1
        else:
            ch = max(MIN_CODE_CHANNELS, ch // 2)
    for half, total in zip(halves, network_params):
        half.fraction = round(half.params / max(total, 1), 5)
    return MKBSpec(ch, h, w, transfer[0], halves, budget, fits)
