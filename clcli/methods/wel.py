"""WEL: Wasserstein embedding learning (after Courty et al. 2018). Each network gets an embedding head on its
global-pooled features (the classifier's input) whose squared distances mimic W2^2 between the input images:

    L_i = CE(z_i, y) + weight * mean_k ( D(e_i(x_k), e_i(x_k')) - W2^2(x_k, x_k') / 2 )^2

with D the squared Euclidean distance between L2-normalised embeddings (bounded, in [0, 4]; unnormalised squared
distances make this regression diverge) and the target scaled as in CL's different-input loss, which computes it
(`losses.different_input_metric_loss`, the partner side detached; each pair is counted both ways, so both images'
embeddings learn). The pairs are fixed for the run (`paired`: the loop puts partners at positions 2k and 2k + 1 of
every batch), so W2^2 is solved once per pair, in the first epoch, and read from the cache after that (CL's
different-input mode does the same with its partner images); the cache is keyed by dataset indices and saved in
the checkpoint, and all networks see the same pairs, so one network's solve is the others' cache hit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clcli import losses
from clcli.features import FeatureRecorder

from ._base import Batch, Method, register



def _pooled_width(net: nn.Module) -> int:
    head = net.get_classifier()
    return getattr(head, "in_features", None) or getattr(head, "in_channels", None) or net.num_features


@register("wel")
class WassersteinEmbeddingLearning(Method):
    recipe_sections = ("wel",)
    paired = True

    def __init__(self, cohort, *, wel):
        super().__init__(cohort)
        cfg = wel
        self.weight = cfg.weight
        self.heads = nn.ModuleList(nn.Linear(_pooled_width(net), cfg.embedding) for net in cohort.networks)
        self.heads.to(next(cohort.parameters()).device)
        self.w2_cache = losses.W2Cache(grid=cfg.w2_grid)  # one entry per pair: half the training images
        self.recorder = FeatureRecorder()  # network index -> its classifier's input in the last forward
        for i, net in enumerate(cohort.networks):
            self.recorder.input_of(i, net.get_classifier())

    def task_state(self) -> dict:
        return {"w2_cache": self.w2_cache.state_dict()}

    def load_task_state(self, state: dict) -> None:
        if "w2_cache" in state:
            self.w2_cache.load_state_dict(state["w2_cache"])

    def pooled(self, i: int) -> torch.Tensor:
        """Network i's global-pooled features [B, C] (a conv classifier head gets them unpooled)."""
        x = self.recorder[i]
        return x.mean(dim=(2, 3)) if x.dim() == 4 else x.flatten(1)

    def embedding_loss(self, i: int, batch: Batch) -> torch.Tensor:
        e = self.heads[i](self.pooled(i)).float()
        idx, raw = batch.indices[i], batch.raw[i]
        w2 = self.w2_cache.get(idx[0::2], idx[1::2], raw[0::2], raw[1::2])  # the batch's fixed pairs
        return (losses.different_input_metric_loss(e[0::2], e[1::2], w2, kind="l2")
                + losses.different_input_metric_loss(e[1::2], e[0::2], w2, kind="l2")) / 2

    def forward(self, batch: Batch) -> dict:
        logits = self.cohort(batch.images, active=batch.active)
        parts: dict[str, torch.Tensor] = {}
        total = 0.0
        for i, (out, target) in enumerate(zip(logits, batch.targets)):
            cls = F.cross_entropy(out, target)
            wel = self.embedding_loss(i, batch)
            parts[f"{i}/cls"], parts[f"{i}/wel"] = cls, wel
            if batch.active is None or batch.active == i:
                total = total + cls + self.weight * wel
        return {"loss": total, "logits": logits, "parts": parts}
