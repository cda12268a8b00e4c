"""CL: collaborative learning through Mutual Knowledge Bases (the paper's method, section III).

For network i:  L_i = L_cls + alpha * (L_metric + L_verification)                      (Eq 1, 2)
- siamese input: L_metric = D(embed_i, embed_j), or for N networks Eq 5 / Eq 6          (Eq 4 line 1)
- different inputs: L_metric = |D(embed_i, embed_j) - W2^2(x_i, x_j)|^2                 (Eq 4 line 2)
- L_verification: a linear softmax classifier on the embedding against the true labels
summed over the MKB sites. Peers' embeddings are detached inside L_i (clcli.losses), so L_i trains network i's
path; the loop back-propagates sum_i L_i (simultaneous) or L_active (iterative). In simultaneous training with
pairwise peers the metric part of sum_i L_i is evaluated once per pair (`losses.summed_metric_loss`: same value, same
gradient). With one network per process (train.placement: per-network) L_i is computed by network i's process, on
the embeddings gathered from all (`Cohort.embeddings`).

Variants beyond the paper (recipe `cl.*`, defaults off; measured in docs/results.md section 4): alpha ramped from 0
over the first epochs (`alpha_warmup`), the verification term's weight, the MKB gate's scale at the start
(`gate_init`), and a logit-level soft-target term from the cohort (`soft_weight`, `soft_target`, `temperature`):
    L_i = L_cls + alpha_e * (L_metric + w_ver * L_verification) + soft_weight * T^2 KL(q || softmax(z_i / T))
"""
from __future__ import annotations

import functools
import operator

import torch
import torch.nn.functional as F

from clcli import losses, mkb

from ._base import Batch, Method, register


@register("cl")
class CollaborativeLearning(Method):
    uses_mkb = True
    per_network = True
    recipe_sections = ("cl",)

    progress_parts = {"metric": "metric", "verification": "ver"}

    def __init__(self, cohort, *, cl):
        super().__init__(cohort)
        self.alpha, self.metric, self.multi, self.input = cl.alpha, cl.metric, cl.multi, cl.input
        self.iterative = cl.manner == "iterative"
        self.w2_cache = losses.W2Cache(grid=cl.w2_grid) if cl.input == "different" else None
        self.full_alpha, self.alpha_warmup, self.verification_weight = cl.alpha, cl.alpha_warmup, \
            cl.verification_weight
        self.soft_weight, self.soft_target, self.temperature = cl.soft_weight, cl.soft_target, cl.temperature
        if cl.gate_init != 0.0:  # a fresh cohort; a resumed one gets its trained gates from the checkpoint
            for net in cohort.networks:
                mkb.init_gates(net, cl.gate_init)

    def set_epoch(self, epoch: int) -> None:
        """alpha ramps linearly from 0 at epoch 0 to its full value at epoch `alpha_warmup`."""
        if self.alpha_warmup > 0:
            self.alpha = self.full_alpha * min(1.0, epoch / self.alpha_warmup)

    def placement_refusal(self) -> str | None:
        if self.soft_weight > 0:
            return "cl.soft_weight needs every network's logits in each process: use train.placement replicated"
        return super().placement_refusal()

    def task_state(self) -> dict:
        return {"w2_cache": self.w2_cache.state_dict()} if self.w2_cache is not None else {}

    def load_task_state(self, state: dict) -> None:
        if self.w2_cache is not None and "w2_cache" in state:
            self.w2_cache.load_state_dict(state["w2_cache"])

    def _metric(self, embeds: list[torch.Tensor], i: int, batch: Batch) -> torch.Tensor:
        if self.input == "siamese":
            return losses.metric_loss(embeds, i, kind=self.metric, multi=self.multi)
        terms = []
        for j in range(len(embeds)):
            if j == i:
                continue
            w2 = self.w2_cache.get(batch.indices[i], batch.indices[j], batch.raw[i], batch.raw[j])
            terms.append(losses.different_input_metric_loss(embeds[i], embeds[j], w2, kind=self.metric))
        return terms[0] if len(terms) == 1 else torch.stack(terms).mean()

    def _metrics(self, embeds: dict[str, list[torch.Tensor]], batch: Batch, mine: list[int]):
        """(sum_i L_metric,i as one term, or None; {i: L_metric,i}) summed over the sites. The joint term is used
        when every network is computed here in one simultaneous step with pairwise peers and a symmetric distance."""
        n = len(self.cohort.networks)
        joint = (batch.active is None and len(mine) == n and (self.multi == "pairwise" or n == 2)
                 and self.metric in losses.SYMMETRIC)
        if not joint:
            return None, {i: _add(self._metric(e, i, batch) for e in embeds.values()) for i in mine}
        w2 = None if self.input == "siamese" else (
            lambda i, j: self.w2_cache.get(batch.indices[i], batch.indices[j], batch.raw[i], batch.raw[j]))
        summed = [losses.summed_metric_loss(e, kind=self.metric, w2=w2) for e in embeds.values()]
        return _add(s for s, _ in summed), {i: _add(values[i] for _, values in summed) for i in mine}

    def forward(self, batch: Batch) -> dict:
        logits = self.cohort(batch.images, active=batch.active)
        embeds = self.cohort.embeddings()          # {site: [embed per network]}
        mine = self.cohort.indices                 # the networks computed in this process
        joint, metric = self._metrics(embeds, batch, mine)
        parts: dict[str, torch.Tensor] = {}
        terms = [] if joint is None else [self.alpha * joint]
        for i in mine:
            target = batch.targets[i]
            cls = F.cross_entropy(logits[i], target)
            verification = _add(
                losses.verification_loss(self.cohort.verifiers[site](e[i].float()), target)
                for site, e in embeds.items()
            )
            parts[f"{i}/cls"], parts[f"{i}/metric"], parts[f"{i}/verification"] = cls, metric[i], verification
            if batch.active is None or batch.active == i:
                own = self.verification_weight * verification
                own = own if joint is not None else metric[i] + own
                loss_i = cls + self.alpha * own
                if self.soft_weight > 0:
                    soft = losses.soft_target_loss(logits, i, target=self.soft_target, temperature=self.temperature)
                    parts[f"{i}/soft"] = soft
                    loss_i = loss_i + self.soft_weight * soft
                terms.append(loss_i)
        return {"loss": _add(terms), "logits": logits, "parts": parts}


def _add(values):
    """Sum without Python's leading `0 +` (one op fewer per call on the training step)."""
    return functools.reduce(operator.add, values)
