"""Right-padded batches of prompts for one batched side pass, and how to split them.

When vLLM encodes several images in one step, scoring them one after another
pays the fixed costs of a side pass (every weight read once per image, the
gradient step at a handful of loss rows, Python overhead) once per image.
Scoring them as one right-padded batch ``[B, S_max, D]`` pays them once per
batch. Padding costs ``B * S_max - sum(S)`` wasted rows, and the batch's
activations grow with ``B * S_max``, so :func:`plan_batches` groups prompts
of similar length under a cap on padded rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: Default cap on ``B * S_max`` padded rows per batched side pass. Measured on
#: one CPU core (``benchmarks/core_speed.py --batch-sizes``, bench shapes,
#: README "Batched side pass"): per image, batches up to about 5,000 rows run
#: at 0.92-1.12x the speed of one prompt at a time, and 12,000-24,000 rows
#: cost 2-17% more (activations outgrow the caches). So a 672x672 LLaVA-NeXT
#: prompt (2,988 rows) runs alone and small images go together. A prompt
#: longer than the cap runs alone.
MAX_BATCH_ROWS = 4096


def pad_rows(rows: Sequence[torch.Tensor], value: float = 0) -> torch.Tensor:
    """Stack ``[S_b, ...]`` tensors into ``[B, max S_b, ...]``, right-padded with ``value``."""
    longest = max(r.shape[0] for r in rows)
    out = rows[0].new_full((len(rows), longest, *rows[0].shape[1:]), value)
    for b, r in enumerate(rows):
        out[b, : r.shape[0]] = r
    return out


def plan_batches(lengths: Sequence[int], max_rows: int = MAX_BATCH_ROWS) -> list[list[int]]:
    """Split prompts (by index) into batches of at most ``max_rows`` padded rows.

    Longest first, each batch takes the next prompts while ``B * S_max`` stays
    within the cap, so lengths in one batch are close and padding is small.
    Deterministic for given lengths; indices inside a batch are ascending.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        # Sorted longest first: a batch's first prompt sets its S_max.
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_rows:
            batches[-1].append(i)
        else:
            batches.append([i])
    return [sorted(b) for b in batches]
