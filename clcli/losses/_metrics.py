"""Distances D between embeddings in the mutual space (paper Eq 4), registered by name so a recipe can pick one.

Every distance is bounded, so the metric loss cannot grow without limit and can be compared with a rescaled W2^2
target (see `different_input_metric_loss`). torch is imported inside the functions so that importing this module (to
list `METRICS` in `clcli --help`, say) stays instant.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from clcli.errors import ClcliError

if TYPE_CHECKING:
    from torch import Tensor

Metric = Callable[["Tensor", "Tensor"], "Tensor"]

METRICS: dict[str, Metric] = {}
# Names of the distances with D(a, b) == D(b, a): for them the loss summed over the networks is evaluated once per
# pair (`summed_metric_loss`) instead of once per network and peer.
SYMMETRIC: set[str] = set()

# Keeps a constant embedding (zero variance / zero norm) finite; far below the variance of any real embedding.
_EPS = 1e-8


def register_metric(name: str, *, symmetric: bool = False) -> Callable[[Metric], Metric]:
    """Decorator: register `fn(a [B, E], b [B, E]) -> D [B]` under `name`; `symmetric=True` declares
    D(a, b) == D(b, a)."""

    def decorate(fn: Metric) -> Metric:
        if name in METRICS:
            raise ValueError(f"metric {name!r} is already registered")
        METRICS[name] = fn
        if symmetric:
            SYMMETRIC.add(name)
        return fn

    return decorate


def _standardise(x: Tensor) -> Tensor:
    """Each row to zero mean and unit (population) variance over its E values: (x - mean) / sqrt(var + eps), which
    is layer normalisation without weight and bias, one fused operator (forward and backward) instead of six."""
    import torch.nn.functional as F

    return F.layer_norm(x, x.shape[1:], eps=_EPS)


@register_metric("dot", symmetric=True)
def dot_distance(a: Tensor, b: Tensor) -> Tensor:
    """1 - <a_hat, b_hat> / E on standardised rows: a Pearson-correlation distance in [0, 2] (the paper's best)."""
    corr = (_standardise(a) * _standardise(b)).mean(dim=1)
    # Rounding can overshoot |corr| = 1 by an ulp; clamp so the documented bounds hold exactly.
    return (1 - corr).clamp(0, 2)


@register_metric("cosine", symmetric=True)
def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """1 - cos(a, b), in [0, 2]."""
    import torch.nn.functional as F

    return (1 - F.cosine_similarity(a, b, dim=1, eps=_EPS)).clamp(0, 2)


@register_metric("l2", symmetric=True)
def l2_distance(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distance between L2-normalised rows, in [0, 4] (= 2 * cosine distance)."""
    import torch.nn.functional as F

    diff = F.normalize(a, dim=1, eps=_EPS) - F.normalize(b, dim=1, eps=_EPS)
    return diff.pow(2).sum(dim=1).clamp(0, 4)


def get_metric(kind: str) -> Metric:
    try:
        return METRICS[kind]
    except KeyError:
        raise ClcliError(f"unknown distance {kind!r}; valid: {', '.join(sorted(METRICS))}") from None


def embedding_distance(a: Tensor, b: Tensor, kind: str = "dot") -> Tensor:
    """Per-sample distance [B] between embeddings [B, E] (flattened if more dims), as float32.

    dot: 1 - <a_hat, b_hat> / E with a_hat, b_hat each sample standardised to zero mean and unit variance over its E
         values (a Pearson-correlation distance), in [0, 2]. The paper's best.
    cosine: 1 - cos(a, b), in [0, 2].
    l2: squared Euclidean distance between L2-normalised embeddings, in [0, 4].
    Unknown kind -> ClcliError naming the valid kinds.
    """
    metric = get_metric(kind)
    if a.dim() < 2 or a.shape[0] != b.shape[0] or a[0].numel() != b[0].numel():
        raise ValueError(f"embeddings must be [B, ...] of equal size, got {tuple(a.shape)} and {tuple(b.shape)}")
    # float32 even under autocast: means, variances and norms over ~1000 values are too coarse in fp16/bf16.
    return metric(a.flatten(1).float(), b.flatten(1).float())
