"""clcli.losses: distances, metric losses (paper Eqs 4-6), verification loss, W2^2 and its cache.

Expected values are worked out by hand in the comments, never by calling the code under test.
"""
import io
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import clcli.losses as L
from clcli.errors import ClcliError
from clcli.losses import _wasserstein


def row(*values: float) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.float32)


# --- distances --------------------------------------------------------------------------------------------------


def test_registry_holds_the_three_distances():
    assert set(L.METRICS) == {"dot", "cosine", "l2"}


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        L.register_metric("dot")(lambda a, b: a)


@pytest.mark.parametrize(
    "a, b, expected",
    [
        # centred a = [-1, 0, 1], b = [-1, 1, 0], both variance 2/3: <a_hat, b_hat> / 3 = (1 / (2/3)) / 3 = 0.5
        ((1, 2, 3), (1, 3, 2), 0.5),
        ((1, 2, 3), (3, 2, 1), 2.0),  # perfectly anti-correlated
        ((1, 2, 3), (2, 4, 6), 0.0),  # correlation ignores scale and offset
    ],
)
def test_dot_is_one_minus_pearson_correlation(a, b, expected):
    assert L.embedding_distance(row(*a), row(*b), "dot").item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ((1, 0), (1, 1), 1 - 1 / math.sqrt(2)),  # 45 degrees
        ((1, 0), (0, 3), 1.0),
        ((1, 0), (-2, 0), 2.0),
    ],
)
def test_cosine_is_one_minus_cosine(a, b, expected):
    assert L.embedding_distance(row(*a), row(*b), "cosine").item() == pytest.approx(expected, abs=1e-6)


def test_l2_is_squared_distance_of_unit_vectors():
    # [3, 4] / 5 = [0.6, 0.8], [0, 2] / 2 = [0, 1]: 0.6^2 + 0.2^2 = 0.4
    assert L.embedding_distance(row(3, 4), row(0, 2), "l2").item() == pytest.approx(0.4, abs=1e-6)


@pytest.mark.parametrize("kind, upper", [("dot", 2.0), ("cosine", 2.0), ("l2", 4.0)])
def test_distances_are_bounded_and_reach_the_bounds(kind, upper):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g) * 5 + 1
    d = L.embedding_distance(a, b, kind)
    assert d.shape == (64,) and d.dtype == torch.float32
    assert (d >= 0).all() and (d <= upper).all()
    assert L.embedding_distance(a, -a, kind) == pytest.approx(torch.full((64,), upper), abs=1e-5)


@pytest.mark.parametrize("kind", ["dot", "cosine", "l2"])
def test_identical_embeddings_are_at_distance_zero_and_more_dims_are_flattened(kind):
    a = torch.randn(4, 8, 2, 2)
    assert L.embedding_distance(a, a.clone(), kind) == pytest.approx(torch.zeros(4), abs=1e-6)


def test_unknown_kind_names_the_valid_ones():
    with pytest.raises(ClcliError, match="cosine, dot, l2"):
        L.embedding_distance(row(1, 2), row(2, 1), "manhattan")


# --- metric losses (Eqs 5 and 6) --------------------------------------------------------------------------------


def three_networks() -> list[torch.Tensor]:
    # Row 0 differs between networks; row 1 is the same everywhere (distance 0), so each loss is half of row 0's.
    return [
        torch.tensor([[1.0, 0.0], [1.0, 0.0]]),
        torch.tensor([[0.0, 1.0], [1.0, 0.0]]),
        torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
    ]


def test_eq5_pairwise_averages_the_distances_to_each_peer():
    # Row 0 of network 0: D(e0, e1) = 1 - 0 = 1, D(e0, e2) = 1 - 1/sqrt(2); mean over peers, then over the batch.
    expected = (1 + (1 - 1 / math.sqrt(2))) / 2 / 2
    loss = L.metric_loss(three_networks(), 0, kind="cosine", multi="pairwise")
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_eq6_mean_compares_with_the_averaged_peers():
    # Row 0: peers' mean = [0.5, 1]; cos([1, 0], [0.5, 1]) = 0.5 / sqrt(1.25).
    expected = (1 - 0.5 / math.sqrt(1.25)) / 2
    loss = L.metric_loss(three_networks(), 0, kind="cosine", multi="mean")
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() != pytest.approx(L.metric_loss(three_networks(), 0, kind="cosine").item(), abs=1e-3)


def test_with_two_networks_both_modes_equal_the_distance():
    a, b = torch.randn(5, 16), torch.randn(5, 16)
    direct = L.embedding_distance(a, b).mean()
    for multi in ("pairwise", "mean"):
        assert L.metric_loss([a, b], 0, multi=multi).item() == pytest.approx(direct.item(), abs=1e-6)


@pytest.mark.parametrize("multi", ["pairwise", "mean"])
def test_metric_loss_trains_only_network_i(multi):
    embeddings = [torch.randn(4, 8, requires_grad=True) for _ in range(3)]
    L.metric_loss(embeddings, 1, multi=multi).backward()
    assert embeddings[1].grad is not None and embeddings[1].grad.abs().sum() > 0
    assert embeddings[0].grad is None and embeddings[2].grad is None


def test_summing_the_losses_over_networks_trains_every_network():
    embeddings = [torch.randn(4, 8, requires_grad=True) for _ in range(3)]
    sum(L.metric_loss(embeddings, i) for i in range(3)).backward()
    assert all(e.grad is not None and e.grad.abs().sum() > 0 for e in embeddings)


@pytest.mark.parametrize("n, different", [(2, False), (3, False), (2, True), (3, True)])
def test_summed_metric_loss_has_the_value_and_gradient_of_the_per_network_sum(n, different):
    # sum_i L_i with detached peers, computed once per network and peer, is the reference; the pair evaluation
    # must give the same total, the same L_i and the same gradient for every embedding.
    torch.manual_seed(n)
    embeddings = [torch.randn(6, 16, requires_grad=True) for _ in range(n)]
    w2 = {(i, j): torch.rand(6) for i in range(n) for j in range(n) if i < j}
    pair = (lambda i, j: w2[min(i, j), max(i, j)]) if different else None

    def loss_i(i):
        if not different:
            return L.metric_loss(embeddings, i, kind="dot", multi="pairwise")
        terms = [L.different_input_metric_loss(embeddings[i], embeddings[j], pair(i, j)) for j in range(n) if j != i]
        return sum(terms) / len(terms)

    per_network = [loss_i(i) for i in range(n)]
    sum(per_network).backward()
    expected = [e.grad.clone() for e in embeddings]
    for e in embeddings:
        e.grad = None
    summed, values = L.summed_metric_loss(embeddings, kind="dot", w2=pair)
    summed.backward()
    assert summed.item() == pytest.approx(sum(v.item() for v in per_network), rel=1e-6)
    assert [v.item() for v in values] == pytest.approx([v.item() for v in per_network], rel=1e-6)
    for e, g in zip(embeddings, expected):
        torch.testing.assert_close(e.grad, g, rtol=1e-5, atol=1e-7)


def test_summed_metric_loss_needs_a_symmetric_distance():
    L.register_metric("first_only_test")(lambda a, b: a.sum(dim=1))
    try:
        with pytest.raises(ClcliError, match="symmetric"):
            L.summed_metric_loss([torch.randn(2, 4), torch.randn(2, 4)], kind="first_only_test")
    finally:
        del L.METRICS["first_only_test"]


def test_metric_loss_rejects_unknown_mode_and_a_single_network():
    e = [torch.randn(2, 4), torch.randn(2, 4)]
    with pytest.raises(ClcliError, match="mean, pairwise"):
        L.metric_loss(e, 0, multi="max")
    with pytest.raises(ClcliError, match="at least 2"):
        L.metric_loss(e[:1], 0)
    with pytest.raises(ClcliError, match="unknown distance"):
        L.metric_loss(e, 0, kind="nope")


def test_verification_is_cross_entropy():
    logits, targets = torch.randn(6, 10), torch.randint(0, 10, (6,))
    assert torch.equal(L.verification_loss(logits, targets), F.cross_entropy(logits, targets))


# --- W2^2 and its cache ---------------------------------------------------------------------------------------


def bright_pixel(row_: int, col: int, size: int = 16) -> torch.Tensor:
    x = torch.zeros(1, 3, size, size)
    x[0, :, row_, col] = 1.0
    return x


def test_w2_of_an_image_with_itself_is_zero():
    x = torch.rand(3, 3, 20, 20)
    w2 = L.wasserstein2_sq(x, x.clone())
    assert w2.dtype == torch.float32 and not w2.requires_grad
    assert w2 == pytest.approx(torch.zeros(3), abs=1e-7)


@pytest.mark.parametrize(
    "p1, p2, expected",
    [
        # 16 px on a grid of 8: pixel (r, c) lands in cell (r // 2, c // 2), centre ((r//2 + .5) / 8, (c//2 + .5) / 8)
        ((0, 0), (2, 5), (1 / 8) ** 2 + (2 / 8) ** 2),  # cells (0, 0) and (1, 2): 5/64
        ((0, 0), (15, 15), 2 * (7 / 8) ** 2),  # opposite corner cells
        ((3, 3), (3, 3), 0.0),
    ],
)
def test_w2_between_single_bright_pixels_is_the_squared_cell_distance(p1, p2, expected):
    w2 = L.wasserstein2_sq(bright_pixel(*p1), bright_pixel(*p2), grid=8)
    assert w2.item() == pytest.approx(expected, abs=1e-6)


def test_w2_does_not_depend_on_the_value_range():
    x1, x2 = torch.randint(0, 256, (2, 2, 3, 12, 12), dtype=torch.uint8)
    as_uint8 = L.wasserstein2_sq(x1, x2, grid=4)
    normalised = L.wasserstein2_sq((x1.float() / 255 - 0.5) / 0.25, (x2.float() / 255 - 0.5) / 0.25, grid=4)
    assert as_uint8 == pytest.approx(normalised, abs=1e-6)


@pytest.fixture
def solver_calls(monkeypatch) -> list[int]:
    """Batch sizes of each call the cache makes into wasserstein2_sq."""
    calls: list[int] = []
    real = _wasserstein.wasserstein2_sq

    def counting(x1, x2, *, grid):
        calls.append(x1.shape[0])
        return real(x1, x2, grid=grid)

    monkeypatch.setattr(_wasserstein, "wasserstein2_sq", counting)
    return calls


def images(n: int) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(n))


def test_cache_solves_only_missing_pairs_and_serves_swapped_ones(solver_calls):
    cache, x = L.W2Cache(grid=4), images(6)
    first = cache.get(torch.tensor([0, 2]), torch.tensor([1, 3]), x[[0, 2]], x[[1, 3]])
    assert (cache.hits, cache.misses, solver_calls) == (0, 2, [2])
    assert first == pytest.approx(L.wasserstein2_sq(x[[0, 2]], x[[1, 3]], grid=4), abs=1e-7)

    # (1, 0) and (3, 2) are the same unordered pairs; only (4, 5) is new.
    second = cache.get(torch.tensor([1, 3, 4]), torch.tensor([0, 2, 5]), x[[1, 3, 4]], x[[0, 2, 5]])
    assert (cache.hits, cache.misses, solver_calls) == (2, 3, [2, 1])
    assert second[:2] == pytest.approx(first, abs=0)
    assert second[2].item() == pytest.approx(L.wasserstein2_sq(x[[4]], x[[5]], grid=4).item(), abs=1e-7)


def test_cache_solves_a_pair_repeated_in_one_batch_once(solver_calls):
    cache, x = L.W2Cache(grid=4), images(2)
    w2 = cache.get(torch.tensor([0, 1]), torch.tensor([1, 0]), x[[0, 1]], x[[1, 0]])
    assert (cache.hits, cache.misses, solver_calls, len(cache)) == (1, 1, [1], 1)
    assert w2[0] == w2[1]


def test_cache_evicts_the_oldest_pair_beyond_max_entries(solver_calls):
    cache, x = L.W2Cache(grid=4, max_entries=2), images(6)
    for a in (0, 2, 4):
        cache.get(torch.tensor([a]), torch.tensor([a + 1]), x[[a]], x[[a + 1]])
    assert len(cache) == 2
    cache.get(torch.tensor([0]), torch.tensor([1]), x[[0]], x[[1]])  # (0, 1) was evicted: solved again
    assert cache.misses == 4 and solver_calls == [1, 1, 1, 1]


def test_cache_state_dict_round_trips_through_a_weights_only_checkpoint(solver_calls):
    cache, x = L.W2Cache(grid=4), images(4)
    idx1, idx2 = torch.tensor([0, 2]), torch.tensor([1, 3])
    values = cache.get(idx1, idx2, x[[0, 2]], x[[1, 3]])

    buffer = io.BytesIO()
    torch.save(cache.state_dict(), buffer)
    buffer.seek(0)
    restored = L.W2Cache(grid=4)
    restored.load_state_dict(torch.load(buffer, weights_only=True))

    assert (restored.hits, restored.misses, len(restored)) == (0, 2, 2)
    assert torch.equal(restored.get(idx2, idx1, x[[1, 3]], x[[0, 2]]), values)
    assert restored.hits == 2 and solver_calls == [2]
    with pytest.raises(ClcliError, match="grid 4"):
        L.W2Cache(grid=8).load_state_dict(cache.state_dict())


# --- different-input metric loss (Eq 4, second line) ---------------------------------------------------------------


def test_different_input_loss_matches_w2_rescaled_to_unit_range():
    e_i = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    e_j = torch.tensor([[0.0, 1.0], [1.0, 0.0]], requires_grad=True)
    w2 = torch.tensor([0.5, 1.0])
    # cosine D = [1, 0]; targets = w2 / 2 = [0.25, 0.5]; mean of 0.75^2 and 0.5^2 = (0.5625 + 0.25) / 2
    loss = L.different_input_metric_loss(e_i, e_j, w2, kind="cosine")
    assert loss.item() == pytest.approx(0.40625, abs=1e-6)
    loss.backward()
    assert e_i.grad is not None and e_j.grad is None


def test_importing_losses_does_not_import_torch():
    code = "import sys, clcli.losses; sys.exit('torch' in sys.modules or 'ot' in sys.modules)"
    repo = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=repo).returncode == 0
