"""Each epoch's evaluation of every network as deployed (with its own MKB halves): on the test images, and on the
validation images where a validation split is held out of the training images."""
from __future__ import annotations

from clcli.evaluation import evaluate, per_class_accuracy

from . import _dist
from ._callbacks import Callback, EpochEnd, Loop


def scores(loop: Loop, networks=None, images=None, labels=None, confusion: bool = False) -> dict[str, dict]:
    """Each network's accuracy measured by rank 0 (and known to every process): the live networks (or `networks`:
    the EMA ones) on the test split (or `images`, `labels`: the validation split), under training's mixed
    precision; with `confusion`, each network's confusion matrix too."""
    data, d, cfg = loop.data, loop.dist, loop.recipe.train
    networks = loop.cohort.networks if networks is None else networks
    images, labels = (data.test_images, data.test_labels) if images is None else (images, labels)
    topk = (1, 5) if len(data.class_names) > 5 else (1,)
    classes = len(data.class_names) if confusion else None
    return _dist.from_main(d, {name: evaluate(net, images, labels, data.mean, data.std, topk=topk,
                                              channels_last=cfg.channels_last, num_classes=classes,
                                              autocast=loop.optimisation.autocast)
                               for name, net in zip(loop.cohort.labels, networks)} if d.main else None)


def top1(measured: dict[str, dict]) -> dict[str, float]:
    return {name: s["top1"] for name, s in measured.items()}


class Evaluation(Callback):
    """Test accuracy (top-1, top-5 with more than 5 classes) and per-class accuracy of the live networks, each
    epoch; the plateau schedule watches its mean unless a validation split is kept."""

    def __init__(self):
        self.last: dict[str, dict] | None = None  # the last epoch's scores, with confusion matrices

    def on_epoch_end(self, loop: Loop, end: EpochEnd) -> None:
        self.last = scores(loop, confusion=True)  # the confusion matrix: a bincount on the device, no extra pass
        end.test_acc = top1(self.last)
        end.record["test_acc"] = {k: round(v, 3) for k, v in end.test_acc.items()}
        if top5 := self._top5():
            end.record["test_top5"] = {k: round(v, 3) for k, v in top5.items()}
        end.watched = sum(end.test_acc.values()) / len(end.test_acc)

    def on_fit_end(self, loop: Loop, summary: dict) -> None:
        if self.last is None:  # resumed after the last epoch's checkpoint: nothing was trained, measure it now
            self.last = scores(loop, confusion=True)
        summary["test_acc"] = top1(self.last)
        if top5 := self._top5():
            summary["test_top5"] = top5
        summary["per_class"] = {name: {"accuracy": per_class_accuracy(s["confusion"]), "confusion": s["confusion"]}
                                for name, s in self.last.items()}

    def _top5(self) -> dict[str, float]:
        return {name: s["top5"] for name, s in self.last.items() if "top5" in s}


class Validation(Callback):
    """Accuracy on the validation split (data.validate, train.keep_best) each epoch: what selects the best epoch or a
    configuration and what the plateau schedule watches, never the test split."""

    def __init__(self):
        self.last: dict[str, float] | None = None

    def on_epoch_end(self, loop: Loop, end: EpochEnd) -> None:
        data = loop.data
        end.val_acc = self.last = top1(scores(loop, None, data.val_images, data.val_labels))
        end.record["val_acc"] = {k: round(v, 3) for k, v in end.val_acc.items()}
        end.watched = sum(end.val_acc.values()) / len(end.val_acc)

    def on_fit_end(self, loop: Loop, summary: dict) -> None:
        if self.last is None:  # resumed after the last epoch's checkpoint
            data = loop.data
            self.last = top1(scores(loop, None, data.val_images, data.val_labels))
        summary["val_acc"] = self.last

