"""Feature-space non-maximum suppression over visual tokens (TRIO step 4).

The reference visits tokens in descending saliency in a host-side Python loop:
keep a token unless an already kept token has cosine similarity >= tau with it,
stop at k, then fill up with the best-scored tokens not yet kept. This module
computes exactly that set without a Python loop over tokens.

Why the round-based version is exact: in saliency order, token j is kept iff no
*kept* token ranked before it suppresses it. Each round marks as kept every
undecided token that no earlier undecided-or-kept token can suppress, and as
suppressed every token suppressed by a kept one. The first undecided token is
always decided in a round, and a decision never changes afterwards, so the
fixed point is the greedy result; the number of rounds is the length of the
longest suppression chain (a handful in practice), each round one
matrix-vector product on the device. Stopping at k keeps the first k greedy
survivors, because the greedy decision for a token never depends on tokens
ranked after it.

Ties in saliency are broken by original index (lower first); the reference
uses an unstable argsort, so its tie order is undefined.
"""

from __future__ import annotations

import torch


def saliency_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices by descending score; equal scores keep their original order."""
    return torch.sort(scores, descending=True, stable=True).indices


def cosine_similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity in float32 (the reference's precision)."""
    f = torch.nn.functional.normalize(features.float(), dim=-1)
    return f @ f.T


def nms_select(
    features: torch.Tensor,
    scores: torch.Tensor,
    k: int,
    tau: float = 0.8,
) -> torch.Tensor:
    """Pick ``k`` of ``N`` tokens by saliency-ordered NMS with fill-up.

    Args:
        features: ``[N, D]`` token features (any float dtype).
        scores: ``[N]`` saliency; higher is more important.
        k: number of tokens to keep (>= 1); ``k >= N`` keeps everything.
        tau: cosine-similarity threshold; a kept token suppresses every token
            with similarity ``>= tau``.

    Returns:
        ``[min(k, N)]`` int64 indices into ``N``, ascending (original order).
    """
    n = features.shape[0]
    if scores.shape != (n,):
        raise ValueError(f"scores must have shape ({n},), got {tuple(scores.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    device = features.device
    if k >= n:
        return torch.arange(n, device=device)

    order = saliency_order(scores)
    sim = cosine_similarity_matrix(features[order])
    # suppresses[i, j]: token ranked i suppresses token ranked j > i if i is kept.
    suppresses = torch.triu(sim >= tau, diagonal=1).float()

    kept = torch.zeros(n, dtype=torch.bool, device=device)
    decided = torch.zeros(n, dtype=torch.bool, device=device)
    while True:
        live = (~decided | kept).float()
        blocked = (live @ suppresses) > 0
        killed = (kept.float() @ suppresses) > 0
        kept = kept | (~decided & ~blocked)
        decided = decided | kept | killed
        undecided = ~decided
        if not bool(undecided.any()):
            break
        first_open = int(undecided.int().argmax())
        if int(kept[:first_open].sum()) >= k:
            break

    kept_ranks = torch.nonzero(kept).squeeze(1)
    # Only the prefix before the first undecided token is final; kept tokens
    # there are the greedy survivors in rank order.
    selected = kept_ranks[:k]
    if selected.numel() < k:
        rest = torch.ones(n, dtype=torch.bool, device=device)
        rest[selected] = False
        fill = torch.nonzero(rest).squeeze(1)[: k - selected.numel()]
        selected = torch.cat([selected, fill])
    return torch.sort(order[selected]).values
