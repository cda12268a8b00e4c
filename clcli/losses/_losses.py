"""The collaborative loss terms of paper Eqs 2 and 4-6: metric (siamese or different input) and verification."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

from clcli.errors import ClcliError

from ._metrics import SYMMETRIC, embedding_distance, get_metric
from ._wasserstein import W2_MAX

if TYPE_CHECKING:
    from torch import Tensor


def _pairwise(e_i: Tensor, peers: list[Tensor], kind: str) -> Tensor:
    """Paper Eq 5: mean over peers j of D(e_i, e_j)."""
    import torch

    if len(peers) == 1:
        return embedding_distance(e_i, peers[0], kind)
    return torch.stack([embedding_distance(e_i, e_j, kind) for e_j in peers]).mean(dim=0)


def _mean(e_i: Tensor, peers: list[Tensor], kind: str) -> Tensor:
    """Paper Eq 6: D(e_i, mean of the peers' embeddings)."""
    import torch

    others = torch.stack([e_j.float() for e_j in peers]).mean(dim=0)
    return embedding_distance(e_i, others, kind)


_MULTI: dict[str, Callable[[Tensor, list[Tensor], str], Tensor]] = {"pairwise": _pairwise, "mean": _mean}


def metric_loss(embeddings: Sequence[Tensor], i: int, *, kind: str = "dot", multi: str = "pairwise") -> Tensor:
    """Siamese-input metric loss of network i (scalar, mean over the batch).

    The peers' embeddings are detached: L_i trains only network i's path, so summing L_i over i trains everyone once,
    and in iterative training the frozen peers get no gradient.
    multi='pairwise' (paper Eq 5): mean over j != i of D(e_i, e_j).
    multi='mean' (paper Eq 6): D(e_i, mean over j != i of e_j).
    With 2 networks both equal D(e_i, e_j).
    """
    get_metric(kind)  # an unknown kind is the user's error; report it before any shape complaint
    try:
        combine = _MULTI[multi]
    except KeyError:
        raise ClcliError(f"unknown multi-network mode {multi!r}; valid: {', '.join(sorted(_MULTI))}") from None
    if len(embeddings) < 2:
        raise ClcliError(f"the metric loss needs at least 2 networks, got {len(embeddings)}")
    if not 0 <= i < len(embeddings):
        raise IndexError(f"network index {i} out of range for {len(embeddings)} embeddings")
    peers = [e.detach() for j, e in enumerate(embeddings) if j != i]
    return combine(embeddings[i], peers, kind).mean()


def summed_metric_loss(embeddings: Sequence[Tensor], *, kind: str = "dot",
                       w2: Callable[[int, int], Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
    """sum_i L_metric,i of simultaneous training, with pairwise peers (paper Eq 5), evaluating each pair once.

    Siamese input (`w2` None): L_i = metric_loss(embeddings, i, multi='pairwise'), the mean over j != i of
    t_ij = mean_b D(e_i, sg(e_j)). Different inputs: `w2(i, j)` gives W2^2 [B] of the pair's images and
    t_ij = different_input_metric_loss(e_i, e_j, w2(i, j)). In both, t is symmetric when D is, so the gradient of
    sum_i L_i with respect to every e_k equals that of T = sum_{i<j} t(e_i, e_j) / (N - 1) with nothing detached,
    and its value is 2 T: one distance per pair (and one backward through it) instead of one per network and peer.

    Returns (a scalar with the value and the gradient of sum_i L_i, [L_i detached, for logging]).
    """
    get_metric(kind)
    if kind not in SYMMETRIC:
        raise ClcliError(f"distance {kind!r} is not registered as symmetric; use metric_loss per network")
    n = len(embeddings)
    if n < 2:
        raise ClcliError(f"the metric loss needs at least 2 networks, got {n}")
    terms: dict[tuple[int, int], Tensor] = {}
    for i in range(n):
        for j in range(i + 1, n):
            distance = embedding_distance(embeddings[i], embeddings[j], kind)
            terms[i, j] = distance.mean() if w2 is None else _w2_term(distance, w2(i, j))

    def mean_of(values: list[Tensor]) -> Tensor:  # over the N - 1 peers (sum(rest, first): no `0 +` op)
        total = sum(values[1:], values[0])
        return total if n == 2 else total / (n - 1)

    half = mean_of(list(terms.values()))
    per_network = [mean_of([terms[min(i, j), max(i, j)].detach() for j in range(n) if j != i]) for i in range(n)]
    return half + half.detach(), per_network


def soft_target_loss(logits: Sequence[Tensor], i: int, *, target: str = "ensemble",
                     temperature: float = 1.0) -> Tensor:
    """Logit-level distillation of network i from the cohort, T^2 * KL(q || softmax(z_i / T)), batch mean, with q
    detached. target='ensemble': q = softmax(mean of every network's logits / T) (KDCL's naive ensemble);
    target='peers': the mean over j != i of KL(softmax(z_j / T) || softmax(z_i / T)) (DML; T = 1 is DML's own)."""
    import torch
    import torch.nn.functional as F

    if len(logits) < 2:
        raise ClcliError(f"soft targets need at least 2 networks, got {len(logits)}")
    t = float(temperature)
    log_p_i = F.log_softmax(logits[i].float() / t, dim=1)
    if target == "ensemble":
        mean = torch.stack([z.detach().float() for z in logits]).mean(dim=0)
        kl = F.kl_div(log_p_i, F.softmax(mean / t, dim=1), reduction="batchmean")
    elif target == "peers":
        kl = torch.stack([F.kl_div(log_p_i, F.softmax(z.detach().float() / t, dim=1), reduction="batchmean")
                          for j, z in enumerate(logits) if j != i]).mean()
    else:
        raise ClcliError(f"unknown soft target {target!r}; valid: ensemble, peers")
    return kl * (t * t)


def verification_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of the linear softmax classifier on an embedding against the true labels."""
    import torch.nn.functional as F

    return F.cross_entropy(logits, targets)


def different_input_metric_loss(e_i: Tensor, e_j: Tensor, w2: Tensor, *, kind: str = "dot") -> Tensor:
    """Paper Eq 4, second line, for different inputs: mean over the batch of (D(e_i, e_j.detach()) - w2 / 2)^2.

    D and W2^2 live on different scales: D is in [0, 2] (dot, cosine) or [0, 4] (l2), W2^2 in [0, 2] because the
    ground cost is the squared distance between cell centres in [0, 1]^2. The target is W2^2 divided by that fixed
    bound, 2, so it lies in [0, 1], inside every D's range. Natural images are close as histograms, so targets are
    typically small: the loss asks embeddings of different images to keep the order and ratios of their W2^2.
    """
    return _w2_term(embedding_distance(e_i, e_j.detach(), kind), w2)


def _w2_term(distance: Tensor, w2: Tensor) -> Tensor:
    if w2.shape != distance.shape:
        raise ValueError(f"w2 must be [B] = {tuple(distance.shape)}, got {tuple(w2.shape)}")
    # A fixed bound, not the batch maximum: a pair's target must not depend on which other pairs share its batch
    # (that would make the target noisy and the cached W2^2 meaningless), and it is deterministic.
    target = w2.detach().to(distance) / W2_MAX
    return (distance - target).pow(2).mean()
