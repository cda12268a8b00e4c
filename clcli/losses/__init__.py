"""Losses of collaborative learning (paper Eqs 1-6): distances in the mutual space, metric and verification losses,
and W2^2 between input images for different-input training.

`METRICS` maps a distance name ('dot', 'cosine', 'l2') to its function; add one with `@register_metric(name)`.
Importing this package does not import torch or POT.
"""
from ._losses import (different_input_metric_loss, metric_loss, soft_target_loss, summed_metric_loss,
                      verification_loss)
from ._metrics import METRICS, SYMMETRIC, embedding_distance, register_metric
from ._wasserstein import W2Cache, wasserstein2_sq

__all__ = [
    "METRICS",
    "SYMMETRIC",
    "W2Cache",
    "different_input_metric_loss",
    "embedding_distance",
    "metric_loss",
    "register_metric",
    "soft_target_loss",
    "summed_metric_loss",
    "verification_loss",
    "wasserstein2_sq",
]
