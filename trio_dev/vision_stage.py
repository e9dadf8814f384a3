"""The optional vision-encoder stage ("w/ VE" in the paper).

Picks tokens from a CLIP tile's [CLS] attention before the language model sees
them: half of the budget as top-k inside non-overlapping windows of a shallow
layer's map (spatial coverage), the rest as global top-k of the penultimate
layer's map with the window picks masked out; every dropped token is then
averaged into its most similar kept token so its content is not lost.

Reference facts kept: 6x6 windows; ``local = int(budget * 0.5)`` split evenly
across windows (``local // num_windows`` each, remainder dropped);
``global = budget - int(budget * 0.5)``; merging is an unweighted mean over
cosine-nearest assignment. Deviation: grids whose side is not a multiple of the
window use partial edge windows (the reference asserts a 24x24 grid).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def window_topk(
    cls_attn: torch.Tensor, grid: tuple[int, int], per_window: int, window: int = 6
) -> torch.Tensor:
    """Top ``per_window`` patches of each ``window x window`` block, as flat indices."""
    h, w = grid
    if cls_attn.shape != (h * w,):
        raise ValueError(f"cls_attn must have {h * w} entries, got {tuple(cls_attn.shape)}")
    if per_window <= 0:
        return torch.empty(0, dtype=torch.long, device=cls_attn.device)
    rows = torch.arange(h, device=cls_attn.device) // window
    cols = torch.arange(w, device=cls_attn.device) // window
    win_id = (rows[:, None] * ((w + window - 1) // window) + cols[None, :]).flatten()
    num_windows = int(win_id.max()) + 1
    # Sort by (window, -score): a single stable sort per key, no Python loop.
    by_score = torch.sort(cls_attn, descending=True, stable=True).indices
    by_window = by_score[torch.sort(win_id[by_score], stable=True).indices]
    wid_sorted = win_id[by_window]
    starts = torch.searchsorted(wid_sorted, torch.arange(num_windows, device=cls_attn.device))
    rank_in_window = torch.arange(h * w, device=cls_attn.device) - starts[wid_sorted]
    return torch.sort(by_window[rank_in_window < per_window]).values


def vision_stage_select(
    cls_attn_shallow: torch.Tensor,
    cls_attn_deep: torch.Tensor,
    grid: tuple[int, int],
    budget: int,
    window: int = 6,
    local_ratio: float = 0.5,
) -> torch.Tensor:
    """Indices (ascending) of the patches one tile keeps before the LLM."""
    n = grid[0] * grid[1]
    if budget >= n:
        return torch.arange(n, device=cls_attn_shallow.device)
    num_windows = ((grid[0] + window - 1) // window) * ((grid[1] + window - 1) // window)
    local_budget = int(budget * local_ratio)
    local = window_topk(cls_attn_shallow, grid, local_budget // num_windows, window)
    deep = cls_attn_deep.clone().float()
    deep[local] = float("-inf")
    global_k = min(budget - local_budget, n - local.numel())
    picked = torch.topk(deep, global_k).indices
    return torch.sort(torch.cat([local, picked])).values


def merge_dropped(features: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Kept features ``[K, D]`` with each dropped token averaged into its nearest kept one."""
    n = features.shape[0]
    dropped_mask = torch.ones(n, dtype=torch.bool, device=features.device)
    dropped_mask[keep] = False
    kept = features[keep]
    dropped = features[dropped_mask]
    if dropped.shape[0] == 0:
        return kept
    sim = F.normalize(dropped.float(), dim=-1) @ F.normalize(kept.float(), dim=-1).T
    target = sim.argmax(dim=-1)
    sums = kept.float().index_add(0, target, dropped.float())
    counts = torch.ones(kept.shape[0], device=features.device).index_add(
        0, target, torch.ones(target.shape[0], device=features.device)
    )
    return (sums / counts[:, None]).to(features.dtype)
