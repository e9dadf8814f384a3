"""Start the scene model's CLIP tower with its first layer's heads on the four neighbours.

Relation questions ("What shape is left of the red circle?") are answered from
the named object's token, so that token must carry its in-tile neighbours
(``train_grid.CHANNELS``' side channels). A tower trained from transformers'
initialisation found those features slowly: after 1,000 vision steps linear
heads read a token's left neighbour's colour 39% and shape 54% of the time (v9),
after 2,000 steps 56% and 64% (v10), while its own colour and shape were read
100% after 175 steps. Finding a neighbour is a fixed attention pattern
(one patch left, right, above or below inside the 8x8 tile), which a
learned absolute position embedding must discover before any content can
follow it.

``neighbour_heads`` writes that pattern into ordinary CLIP weights, so the
checkpoint stays one vLLM serves: a 16-dimensional Fourier code of each
patch's (column, row) goes into the position embeddings (dimensions no patch
or class embedding writes to), and head ``h`` of layer 0 gets a query that is
the code rotated by one cell towards side ``h`` and a key that is the code
itself, so its score peaks on that neighbour. Values and outputs keep their
random initialisation; training keeps changing every weight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

#: Frequencies of the code (cycles per ``2 * side`` cells: no wrap-around inside a tile).
_FREQUENCIES = (1, 2, 3, 4)
#: Code width: a (cos, sin) pair per frequency, for columns and for rows.
CODE_DIMS = 4 * len(_FREQUENCIES)


def position_code(side: int) -> torch.Tensor:
    """``[side * side, CODE_DIMS]`` code of each patch in CLIP's row-major order."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    parts = []
    for where in (cols.reshape(-1), rows.reshape(-1)):
        for f in _FREQUENCIES:
            angle = 2 * math.pi * f * where.double() / (2 * side)
            parts += [angle.cos(), angle.sin()]
    return torch.stack(parts, dim=-1).float()


def shift_matrix(side: int, dx: int, dy: int) -> torch.Tensor:
    """``[CODE_DIMS, CODE_DIMS]`` map from a patch's code to its ``(dx, dy)`` neighbour's."""
    blocks = []
    for step in (dx, dy):
        for f in _FREQUENCIES:
            a = 2 * math.pi * f * step / (2 * side)
            blocks.append(torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]))
    return torch.block_diag(*blocks).float()


def neighbour_heads(
    tower: nn.Module,
    offsets: Sequence[tuple[int, int]],
    amplitude: float = 1.5,
    sharpness: float = 12.0,
) -> None:
    """Make head ``h`` of the first encoder layer of CLIP vision model ``tower``
    attend from every patch to its ``offsets[h]`` = (dx, dy) neighbour.

    ``amplitude`` scales the position code against the patch embeddings,
    ``sharpness`` the head's scores; with the defaults, at initialisation every
    patch that has that neighbour puts at least 0.9 of the head's attention on
    it (``tests/test_quality_grid.py``; 0.93-0.97 measured on scene tiles).
    """
    emb = tower.embeddings
    attn = tower.encoder.layers[0].self_attn
    if len(offsets) > attn.num_heads:
        raise ValueError(f"{len(offsets)} offsets for {attn.num_heads} heads")
    if attn.head_dim < CODE_DIMS:
        raise ValueError(f"head size {attn.head_dim} is below the code's {CODE_DIMS} dimensions")
    side = emb.image_size // emb.patch_size
    code = slice(emb.embed_dim - CODE_DIMS, emb.embed_dim)
    with torch.no_grad():
        emb.patch_embedding.weight[code] = 0.0
        if emb.patch_embedding.bias is not None:
            emb.patch_embedding.bias[code] = 0.0
        emb.class_embedding[code] = 0.0
        emb.position_embedding.weight[:, code] = 0.0
        emb.position_embedding.weight[1:, code] = amplitude * position_code(side)
        for h, (dx, dy) in enumerate(offsets):
            rows = slice(h * attn.head_dim, h * attn.head_dim + CODE_DIMS)
            for proj in (attn.q_proj, attn.k_proj):
                proj.weight[rows] = 0.0
                proj.bias[rows] = 0.0
            # score = q . k = sharpness * code(p + offset) . code(j), largest at j = p + offset
            attn.q_proj.weight[rows, code] = sharpness * shift_matrix(side, dx, dy)
            attn.k_proj.weight[rows, code] = torch.eye(CODE_DIMS)
            rest = slice(h * attn.head_dim + CODE_DIMS, (h + 1) * attn.head_dim)
            attn.q_proj.weight[rest] = 0.0
            attn.q_proj.bias[rest] = 0.0
