"""train.keep_best and train.patience: per network, the epoch of its best validation accuracy, that epoch's test
accuracy and weights (its MKB halves included); early stop once no network has improved for `patience` epochs."""
from __future__ import annotations

from ._callbacks import Callback, EpochEnd, Loop


class Best(Callback):
    key = "best"

    def __init__(self, labels: list[str], patience: int | None):
        self.labels, self.patience = labels, patience
        self.epoch: dict[str, int] = {}
        self.val_acc: dict[str, float] = {}
        self.test_acc: dict[str, float] = {}
        self.weights: dict[str, dict] = {}
        self.stopped_early: int | None = None  # the epochs trained when patience ran out

    def on_fit_start(self, loop: Loop) -> None:
        if self.exhausted(loop.start_epoch - 1):  # a resumed run that had stopped: nothing more to train
            self.stopped_early = loop.start_epoch
            loop.stop = f"train.patience had already stopped this run after epoch {loop.start_epoch}"

    def on_epoch_end(self, loop: Loop, end: EpochEnd) -> None:
        self.update(end.epoch, end.val_acc, end.test_acc, loop.cohort.networks)  # after Validation and Evaluation
        end.record["best_epoch"] = {name: e + 1 for name, e in self.epoch.items()}
        if self.exhausted(end.epoch):
            self.stopped_early = end.epoch + 1
            loop.stop = (f"no network has improved on the validation split for {self.patience} epochs: "
                         f"stopped after epoch {end.epoch + 1} (train.patience)")

    def on_fit_end(self, loop: Loop, summary: dict) -> None:
        summary["best"] = {name: {"epoch": self.epoch[name] + 1, "val_acc": self.val_acc[name],
                                  "test_acc": self.test_acc[name]} for name in self.labels}
        if self.stopped_early is not None:
            summary["stopped_early"] = self.stopped_early

    def update(self, epoch: int, val: dict[str, float], test: dict[str, float], networks) -> None:
        for name, net in zip(self.labels, networks):
            if name not in self.val_acc or val[name] > self.val_acc[name]:
                self.epoch[name], self.val_acc[name], self.test_acc[name] = epoch, val[name], test[name]
                self.weights[name] = {k: v.detach().clone() for k, v in net.state_dict().items()}

    def exhausted(self, epoch: int) -> bool:
        return (self.patience is not None and len(self.epoch) == len(self.labels)
                and all(epoch - self.epoch[name] >= self.patience for name in self.labels))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "val_acc": self.val_acc, "test_acc": self.test_acc, "networks": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.val_acc, self.test_acc = dict(state["epoch"]), dict(state["val_acc"]), dict(state["test_acc"])
        self.weights = dict(state["networks"])
