"""Test accuracy of networks as deployed (each with its own MKB halves), on uint8 images in memory or streamed: one
network (`evaluate`), or an ensemble of them averaging their probabilities (`ensemble_accuracy`, the EL row)."""
from __future__ import annotations

import torch
from torch import nn

from clcli.data import eval_batches, to_input


@torch.no_grad()
def evaluate(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean, std, *, batch_size: int = 500,
             topk: tuple[int, ...] = (1,), channels_last: bool = False,
             autocast: tuple[bool, torch.dtype] = (False, torch.float16)) -> dict[str, float]:
    """Accuracy (%) of one network (with its own MKB halves, as deployed) on uint8 images; `autocast` (on?, dtype):
    training's mixed precision, so that evaluating during training runs at the training step's speed."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    correct = {k: torch.zeros((), dtype=torch.int64, device=device) for k in topk}  # on the device: no sync per batch
    n = 0  # counted per batch: a streamed split leaves out images it cannot decode
    for xb, yb in eval_batches(images, labels, batch_size):
        n += len(yb)
        x = to_input(xb.to(device), mean, std, channels_last)
        y = yb.to(device)
        with torch.autocast(device.type, dtype=autocast[1], enabled=autocast[0]):
            logits = net(x)
        top = logits.topk(max(topk), dim=1).indices
        for k in topk:
            correct[k] += (top[:, :k] == y[:, None]).any(dim=1).sum()
    net.train(was_training)
    n = max(n, 1)
    return {f"top{k}": 100.0 * c / n for k, c in zip(correct, torch.stack(list(correct.values())).tolist())}


@torch.no_grad()
def ensemble_probabilities(networks: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Mean over the networks of softmax(logits): [B, classes]."""
    return torch.stack([net(x).float().softmax(dim=1) for net in networks]).mean(dim=0)


@torch.no_grad()
def ensemble_accuracy(networks: list[nn.Module], images: torch.Tensor, labels: torch.Tensor, mean, std, *,
                         batch_size: int = 500) -> float:
    """Top-1 accuracy (%) of the averaged probabilities on uint8 images."""
    for net in networks:
        net.eval()
    correct = seen = 0
    for xb, yb in eval_batches(images, labels, batch_size):
        x = to_input(xb, mean, std)
        probs = ensemble_probabilities(networks, x)
        correct += (probs.argmax(dim=1) == yb).sum().item()
        seen += len(yb)  # a streamed split leaves out images it cannot decode
    return 100.0 * correct / max(seen, 1)


__all__ = ["evaluate", "ensemble_probabilities", "ensemble_accuracy"]
