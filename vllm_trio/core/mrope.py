"""Qwen2.5-VL's multimodal rotary positions (M-RoPE), for the side pass and the pruned prompt.

Qwen2.5-VL gives every token three positions (temporal, height, width). Text
tokens have the same value in all three, counting up; an image's merged
``h x w`` grid sits at ``base + (0, i, j)`` where ``base`` is the position
the first image token would have had as text, and the text after the image
continues at ``base + max(h, w)``. Dropping visual tokens (TRIO) keeps the
kept tokens' ``(t, h, w)`` and the text positions of the unpruned prompt, so
the pruned prompt sees exactly the rotations HF gives the same rows.

The rotary of a row is built from three rows of the cos/sin table: the first
``mrope_section[0]`` frequencies from the temporal position, the next
``mrope_section[1]`` from the height, the rest from the width (the
non-interleaved layout of Qwen2-VL / Qwen2.5-VL). :func:`mrope_cos_sin` turns
that into one per-row table, so the plain layer (``llama_layer``) rotates
with it as if each row had its own position.
"""

from __future__ import annotations

import torch


def mrope_cos_sin(
    cos_sin: torch.Tensor, positions: torch.Tensor, mrope_section: list[int]
) -> torch.Tensor:
    """Per-row ``[cos | sin]`` ``[S, rotary_dim]`` for 3-row ``positions`` ``[3, S]``.

    ``cos_sin`` is vLLM's table ``[max_pos, rotary_dim]`` (``cos`` half then
    ``sin`` half, ``rotary_dim / 2 == sum(mrope_section)``).
    """
    cos, sin = cos_sin[positions].chunk(2, dim=-1)  # [3, S, rot/2] each
    cos = torch.cat([c[i] for i, c in enumerate(cos.split(mrope_section, dim=-1))], dim=-1)
    sin = torch.cat([s[i] for i, s in enumerate(sin.split(mrope_section, dim=-1))], dim=-1)
    return torch.cat([cos, sin], dim=-1)


def image_grid_positions(grid_h: int, grid_w: int) -> torch.Tensor:
    """``[3, h * w]`` positions of an image's merged tokens relative to ``base`` (raster order)."""
    hh, ww = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    return torch.stack([torch.zeros(grid_h * grid_w, dtype=torch.long), hh.flatten(), ww.flatten()])


def image_in_text_positions(before: int, grid_h: int, grid_w: int, after: int) -> torch.Tensor:
    """``[3, before + h * w + after]`` positions of one unpruned image between two texts."""
    text_before = torch.arange(before).expand(3, -1)
    image = image_grid_positions(grid_h, grid_w) + before
    text_after = torch.arange(after).expand(3, -1) + before + max(grid_h, grid_w)
    return torch.cat([text_before, image, text_after], dim=1)
