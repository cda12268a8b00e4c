"""EL: ensemble learning. Not trained: the IL networks' softmax probabilities are averaged and the ensemble's
test accuracy is one number. (The paper adds a trainable FC layer on the combined predictions; averaging the
probabilities is the parameter-free version.) `clcli compare` computes it from the IL run of each seed.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from clcli.errors import ClcliError

from ._base import Method, register


@torch.no_grad()
def ensemble_probabilities(networks: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Mean over the networks of softmax(logits): [B, classes]."""
    return torch.stack([net(x).float().softmax(dim=1) for net in networks]).mean(dim=0)


@torch.no_grad()
def ensemble_accuracy_of(networks: list[nn.Module], images: torch.Tensor, labels: torch.Tensor, mean, std, *,
                         batch_size: int = 500) -> float:
    """Top-1 accuracy (%) of the averaged probabilities on uint8 images."""
    from clcli.train._loop import eval_batches, to_input

    for net in networks:
        net.eval()
    correct = seen = 0
    for xb, yb in eval_batches(images, labels, batch_size):
        x = to_input(xb, mean, std)
        probs = ensemble_probabilities(networks, x)
        correct += (probs.argmax(dim=1) == yb).sum().item()
        seen += len(yb)  # a streamed split leaves out images it cannot decode
    return 100.0 * correct / max(seen, 1)


def ensemble_accuracy(run_dir: str | Path) -> float:
    """EL accuracy (%) of a finished run's networks (the IL run, for the paper's EL row) on its test split."""
    from clcli.export import _cohort_from_run
    from clcli.train import load_data

    info, recipe, _, cohort, _ = _cohort_from_run(Path(run_dir))
    data = load_data(recipe, torch.device("cpu"))
    return ensemble_accuracy_of(list(cohort.networks), data.test_images, data.test_labels, info["mean"], info["std"])


class _ComputedByCompare:
    """`uses_mkb` is the first thing `clcli train` asks of every method: answering with an error there stops a
    training run of EL before any folder is written or data loaded."""

    def __get__(self, obj, owner):
        raise ClcliError("el (ensemble learning) is not trained: it is computed from the IL runs by "
                         "`clcli compare --methods il,el,...` (or clcli.methods.el.ensemble_accuracy(<IL run>))")


@register("el")
class EnsembleLearning(Method):
    uses_mkb = _ComputedByCompare()
