"""Test accuracy of networks as deployed (each with its own MKB halves; a PyTorch module or an ONNX export run by
ONNX Runtime), on uint8 images in memory or streamed: one network (`evaluate`), or an ensemble of them averaging
their probabilities (`ensemble_accuracy`, the EL row)."""
from __future__ import annotations

import torch
from torch import nn

from clcli.data import eval_batches, to_input


def device_of(net: nn.Module) -> torch.device:
    """Where a network's inputs go: its parameters' device; the CPU for one without parameters (an ONNX export run
    by ONNX Runtime, which takes CPU tensors)."""
    param = next(net.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def evaluate(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean, std, *, batch_size: int = 500,
             topk: tuple[int, ...] = (1,), channels_last: bool = False, num_classes: int | None = None,
             autocast: tuple[bool, torch.dtype] = (False, torch.float16)) -> dict:
    """Accuracy (%) of one network (with its own MKB halves, as deployed) on uint8 images: {"top1", "top5", ...}.
    With `num_classes`, also "confusion": the confusion matrix, [true class][predicted class] image counts.
    `autocast` (on?, dtype): training's mixed precision, so that evaluating during training runs at the training
    step's speed."""
    was_training = net.training
    net.eval()
    device = device_of(net)
    correct = {k: torch.zeros((), dtype=torch.int64, device=device) for k in topk}  # on the device: no sync per batch
    confusion = torch.zeros(num_classes * num_classes if num_classes else 0, dtype=torch.int64, device=device)
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
        if num_classes:
            confusion += torch.bincount(y * num_classes + top[:, 0], minlength=num_classes * num_classes)
    net.train(was_training)
    n = max(n, 1)
    result = {f"top{k}": 100.0 * c / n for k, c in zip(correct, torch.stack(list(correct.values())).tolist())}
    if num_classes:
        result["confusion"] = confusion.view(num_classes, num_classes).tolist()
    return result


def per_class_accuracy(confusion: list[list[int]]) -> list[float | None]:
    """Each class's accuracy (%) from a confusion matrix (rows: true class): right answers over the class's images;
    None for a class without images."""
    return [100.0 * row[k] / sum(row) if sum(row) else None for k, row in enumerate(confusion)]


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


__all__ = ["evaluate", "device_of", "per_class_accuracy", "ensemble_probabilities", "ensemble_accuracy"]
