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

import math

import torch


def saliency_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices by descending score; equal scores keep their original order."""
    return torch.sort(scores, descending=True, stable=True).indices


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
    if k >= n:
        return torch.arange(n, device=features.device)

    order = saliency_order(scores)
    # Cosine similarity in float32, the reference's precision.
    feats = torch.nn.functional.normalize(features[order].float(), dim=-1)
    kept = torch.zeros(n, dtype=torch.bool, device=features.device)
    # Greedy decisions for a prefix of ranks depend on that prefix only, so
    # decide ranks block by block: first a block a little longer than k, then
    # (only when suppression left fewer than k survivors) the next block,
    # sized by the observed survival rate, with the survivors so far applied.
    start, stop, found = 0, min(n, max(2 * k, 64)), 0
    while True:
        block = feats[start:stop]
        survivors = feats[:start][kept[:start]]
        pre_killed = ((block @ survivors.T) >= tau).any(dim=1)
        kept_block, complete = _greedy_block(block, pre_killed, k - found, tau)
        kept[start:stop] = kept_block
        found += int(kept_block.sum())
        if complete or stop == n:
            break
        # Aim for twice the survivors still needed; past half of N, take all.
        want = max(2 * stop, math.ceil(2 * stop * k / max(found, 1)))
        start, stop = stop, n if want > n // 2 else want
    selected = torch.nonzero(kept).squeeze(1)[:k]
    if selected.numel() < k:
        rest = torch.ones(n, dtype=torch.bool, device=features.device)
        rest[selected] = False
        fill = torch.nonzero(rest).squeeze(1)[: k - selected.numel()]
        selected = torch.cat([selected, fill])
    return torch.sort(order[selected]).values


def _greedy_block(
    feats: torch.Tensor, pre_killed: torch.Tensor, k: int, tau: float
) -> tuple[torch.Tensor, bool]:
    """Greedy NMS over consecutive ranks ``feats`` ``[m, D]`` (unit rows).

    ``pre_killed`` marks ranks already suppressed by survivors of earlier
    blocks. Returns the kept mask and whether it already holds ``k`` greedy
    survivors that no later rank can change.
    """
    m = feats.shape[0]
    # suppresses[i, j]: rank i suppresses rank j > i if i is kept.
    suppresses = torch.triu((feats @ feats.T) >= tau, diagonal=1).to(feats.dtype)
    kept = torch.zeros(m, dtype=torch.bool, device=feats.device)
    decided = pre_killed.clone()
    while True:
        for _ in range(2):  # rounds are cheap; check (a host sync) every other one
            open_ = ~decided
            # Row 0: who may still suppress (undecided or kept); row 1: kept.
            state = torch.stack([open_ | kept, kept]).to(feats.dtype)
            blocked, killed = ((state @ suppresses) > 0).unbind(0)
            kept = kept | (open_ & ~blocked)
            decided = decided | kept | killed
        # Kept marks before the first undecided rank are final.
        final_kept, all_decided = torch.stack(
            [(kept & (decided.logical_not().cumsum(0) == 0)).sum(), decided.all()]
        ).tolist()
        if final_kept >= k:
            return kept, True
        if all_decided:
            return kept, False
