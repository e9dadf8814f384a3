"""``nms_select`` must pick exactly the set the reference's greedy loop picks.

The oracle below is the reference's host-side loop written out plainly. Both
sides are compared on similarity matrices whose entries cannot depend on
summation order (features with entries ``±2^-m``, so every dot product is
exact in float32), which makes ``>= tau`` edge cases meaningful; continuous
random features are compared only where no similarity lies within a margin
of ``tau`` (float32 GEMMs may round differently when rows are permuted).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from vllm_trio.core.nms import nms_select


def greedy_oracle(sim: np.ndarray, scores: list[float], k: int, tau: float) -> list[int]:
    """The reference's loop: by descending score (ties: lower index), fill-up."""
    n = len(scores)
    order = sorted(range(n), key=lambda i: (-scores[i], i))
    kept: list[int] = []
    suppressed = np.zeros(n, dtype=bool)
    for i in order:
        if len(kept) >= k:
            break
        if suppressed[i]:
            continue
        kept.append(i)
        suppressed |= sim[i] >= tau
    for i in order:
        if len(kept) >= k:
            break
        if i not in kept:
            kept.append(i)
    return sorted(kept)


def exact_sim(features: torch.Tensor) -> np.ndarray:
    """Cosine similarity in float64 (exact for the quantised features used here)."""
    f = features.double()
    f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (f @ f.T).numpy()


def sign_features(gen: torch.Generator, n: int, dim: int) -> torch.Tensor:
    """Rows of ``±1``: normalised entries are ``±1/sqrt(dim)``, exact for dim = 4^m."""
    return torch.randint(0, 2, (n, dim), generator=gen).float() * 2 - 1


def clustered_sign_features(
    gen: torch.Generator, n: int, dim: int, clusters: int, flips: int
) -> torch.Tensor:
    """``±1`` rows near a few centres; similarities are multiples of ``2/dim``."""
    centres = sign_features(gen, clusters, dim)
    feats = centres[torch.randint(0, clusters, (n,), generator=gen)].clone()
    for _ in range(flips):
        col = torch.randint(0, dim, (n,), generator=gen)
        flip = torch.rand(n, generator=gen) < 0.5
        rows = torch.arange(n)[flip]
        feats[rows, col[flip]] *= -1
    return feats


def check(features: torch.Tensor, scores: torch.Tensor, k: int, tau: float) -> None:
    got = nms_select(features, scores, k, tau)
    want = greedy_oracle(exact_sim(features), scores.tolist(), k, tau)
    assert got.dtype == torch.int64
    assert got.tolist() == want, (k, tau)


@pytest.mark.parametrize("seed", range(40))
def test_matches_oracle_quantised(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 80, (1,), generator=gen))
    dim = 16
    feats = clustered_sign_features(gen, n, dim, clusters=max(1, n // 8), flips=3)
    # Scores with many ties: small integer range.
    scores = torch.randint(0, 6, (n,), generator=gen).float()
    # tau on the lattice of attainable similarities (multiples of 1/8), so
    # some pairs sit exactly at tau: the ">=" edge.
    for tau in (-1.0, -0.25, 0.0, 0.5, 0.75, 0.875, 1.0):
        for k in {1, 2, max(1, n // 4), max(1, n // 2), n, n + 3}:
            check(feats, scores, k, tau)


def test_tau_edge_is_inclusive() -> None:
    # e0 and (e0 + e1 + e2 + e3)/2 have similarity exactly 0.5.
    feats = torch.tensor([[1.0, 0, 0, 0], [1.0, 1, 1, 1], [0, 1.0, 0, 0]])
    scores = torch.tensor([3.0, 2.0, 1.0])
    assert nms_select(feats, scores, 2, tau=0.5).tolist() == [0, 2]  # 1 suppressed
    assert nms_select(feats, scores, 2, tau=0.5 + 1e-6).tolist() == [0, 1]


def test_tau_one_and_minus_one() -> None:
    gen = torch.Generator().manual_seed(1)
    base = sign_features(gen, 10, 16)
    feats = torch.cat([base, base[:4]])  # rows 10..13 duplicate rows 0..3
    scores = torch.rand(14, generator=gen)
    # tau = 1: only exact duplicates suppress each other.
    got = nms_select(feats, scores, 10, tau=1.0).tolist()
    assert got == greedy_oracle(exact_sim(feats), scores.tolist(), 10, 1.0)
    for a in range(4):
        assert not (a in got and a + 10 in got)
    # tau = -1: the first kept suppresses everything; the rest is fill-up by score.
    feats_c = torch.randn(30, 8, generator=gen)
    scores_c = torch.randn(30, generator=gen)
    top = torch.topk(scores_c, 7).indices.sort().values.tolist()
    assert nms_select(feats_c, scores_c, 7, tau=-1.0).tolist() == top


def test_duplicates_and_score_ties_break_by_index() -> None:
    feats = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [0, 1.0], [1.0, 0]])
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    # Visit 0,1,2,3,4: keep 0 (kills 1, 4), keep 2 (kills 3).
    assert nms_select(feats, scores, 2, tau=0.8).tolist() == [0, 2]
    # k = 3: only two survivors, fill with the best-ranked not kept: 1.
    assert nms_select(feats, scores, 3, tau=0.8).tolist() == [0, 1, 2]
    assert nms_select(feats, scores, 4, tau=0.8).tolist() == [0, 1, 2, 3]


def test_fill_up_when_few_survive() -> None:
    gen = torch.Generator().manual_seed(2)
    feats = clustered_sign_features(gen, 60, 16, clusters=3, flips=0)
    scores = torch.randn(60, generator=gen)
    # Exactly 3 distinct rows: at most 3 NMS survivors, the rest is fill-up.
    for k in (3, 5, 20, 59):
        check(feats, scores, k, 0.8)


def test_small_sizes() -> None:
    one = torch.randn(1, 8)
    assert nms_select(one, torch.tensor([0.3]), 1).tolist() == [0]
    assert nms_select(one, torch.tensor([0.3]), 5).tolist() == [0]
    feats = torch.randn(5, 8)
    scores = torch.randn(5)
    assert nms_select(feats, scores, 5).tolist() == [0, 1, 2, 3, 4]
    assert nms_select(feats, scores, 9).tolist() == [0, 1, 2, 3, 4]
    assert nms_select(feats, scores, 1).tolist() == [int(scores.argmax())]


@pytest.mark.parametrize("k", [0, -1])
def test_k_below_one_raises(k: int) -> None:
    with pytest.raises(ValueError, match="k must be"):
        nms_select(torch.randn(4, 3), torch.randn(4), k)


def test_bad_scores_shape_raises() -> None:
    with pytest.raises(ValueError, match="scores"):
        nms_select(torch.randn(4, 3), torch.randn(5), 2)


@pytest.mark.parametrize("seed", range(20))
def test_matches_oracle_continuous(seed: int) -> None:
    gen = torch.Generator().manual_seed(100 + seed)
    n = int(torch.randint(2, 64, (1,), generator=gen))
    dim = int(torch.randint(2, 12, (1,), generator=gen))
    feats = torch.randn(n, dim, generator=gen)
    scores = torch.randn(n, generator=gen)
    sim = exact_sim(feats)
    off = sim[~np.eye(n, dtype=bool)]
    tried = 0
    for _ in range(50):
        tau = float(torch.empty(1).uniform_(-0.5, 0.99, generator=gen))
        if off.size and np.abs(off - tau).min() < 1e-4:
            continue  # a float32 rounding could flip this pair: not a fair case
        tried += 1
        for k in (1, max(1, n // 3), n - 1):
            check(feats, scores, k, tau)
        if tried == 5:
            break
    assert tried > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_features(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    # ±1 rows are exact in half precision, so the oracle sees the same values.
    feats = clustered_sign_features(gen, 70, 16, clusters=6, flips=2).to(dtype)
    scores = torch.randn(70, generator=gen).to(dtype)
    for tau in (0.5, 0.75, 0.8):
        for k in (1, 10, 40):
            got = nms_select(feats, scores, k, tau)
            want = greedy_oracle(exact_sim(feats.float()), scores.float().tolist(), k, tau)
            assert got.tolist() == want
    # Continuous half-precision features: the oracle reads the rounded values.
    feats_c = torch.randn(50, 6, generator=gen).to(dtype)
    sim = exact_sim(feats_c.float())
    tau = 0.6
    assert np.abs(sim[~np.eye(50, dtype=bool)] - tau).min() > 1e-4
    got = nms_select(feats_c, scores[:50], 12, tau)
    assert got.tolist() == greedy_oracle(sim, scores[:50].float().tolist(), 12, tau)


class _CountCalls(TorchFunctionMode):
    """Counts torch calls, to bound how much work is done per token."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("clusters", "k"), [(40, 300), (400, 300), (2500, 2000)])
def test_large_clustered_no_per_token_loop(clusters: int, k: int) -> None:
    gen = torch.Generator().manual_seed(clusters)
    n = 3000
    feats = clustered_sign_features(gen, n, 64, clusters=clusters, flips=6)
    scores = torch.randn(n, generator=gen)
    tau = 0.8125  # a lattice value (multiples of 1/32): plenty of exact ties
    with _CountCalls() as counter:
        got = nms_select(feats, scores, k, tau)
    want = greedy_oracle(exact_sim(feats), scores.tolist(), k, tau)
    assert got.tolist() == want
    # A per-token loop would issue thousands of torch calls; the round-based
    # version issues a few per suppression-chain round.
    assert counter.calls < n // 10, counter.calls
