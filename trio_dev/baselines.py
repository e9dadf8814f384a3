"""Baseline visual-token selections that TRIO is compared against (pure PyTorch).

Every selector answers the same question as TRIO's ``nms_select``: which ``k``
of an image's ``N`` visual tokens survive. They all return the kept indices
into the ``N`` tokens as an ascending ``int64`` tensor (original order, as the
pruned prompt keeps them), keep everything when ``k >= N``, and break ties by
the lower index, so every result is deterministic and testable exactly.

The ``N`` tokens are LLaVA-NeXT's *packed* sequence for one image
("spatial_unpad", what both HF transformers and vLLM feed the language model):

1. the base (low-resolution, whole-image) tile: ``p x p`` patches, row-major;
2. the anyres tiles stitched into one ``(rows * p) x (cols * p)`` patch grid,
   cropped to the image's aspect ratio ("unpadding"), row-major, each grid row
   followed by one ``image_newline`` token.

:class:`PackedLayout` records where each packed token comes from, so selectors
that reason in space (``grid_select``) or on per-tile vision-encoder data
(``cls_attention_select``) can work on the packed sequence.

Baselines (names as in the quality harness):

* ``random_select``: uniform random subset, seeded.
* ``grid_select``: uniform spatial subsampling (a lattice per region).
* ``cls_attention_select``: VisionZip-style "dominant tokens", top-k of the
  CLIP [CLS] attention of the penultimate vision layer.
* ``text_attention_select``: FastV-style, top-k of the attention that the
  last prompt token(s) pay to the visual tokens at a shallow decoder layer.
* ``diversity_select``: pure diversity, greedy k-center (farthest point) on
  cosine distance, no notion of importance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "PackedLayout",
    "cls_attention_select",
    "diversity_select",
    "grid_select",
    "lattice_points",
    "llava_next_layout",
    "random_select",
    "text_attention_select",
    "top_k_ascending",
]

#: ``PackedLayout.tile`` value of an ``image_newline`` token.
NEWLINE = -1


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def top_k_ascending(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest ``scores`` ``[N]``, returned ascending.

    Ties go to the lower index (stable sort), unlike ``torch.topk`` whose tie
    order is unspecified. ``-inf`` scores are picked last, NaN is refused.
    """
    _check_k(k)
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D, got shape {tuple(scores.shape)}")
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN")
    n = scores.shape[0]
    if k >= n:
        return torch.arange(n, device=scores.device)
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return torch.sort(order[:k]).values


# --------------------------------------------------------------------------- #
# Packed layout
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class PackedLayout:
    """Provenance of each of one image's ``N`` packed LLaVA-NeXT visual tokens.

    Attributes:
        tile: ``[N]`` 0 for the base tile, ``1 + r * cols + c`` for the anyres
            tile in tile-row ``r``, tile-column ``c``; ``NEWLINE`` (-1) for an
            ``image_newline`` token.
        patch: ``[N]`` row-major patch index inside its tile (``-1`` for newlines).
        row, col: ``[N]`` position in the token's region: the base tile's
            ``p x p`` grid, or the unpadded anyres grid ``(grid_h, grid_w)``; a
            newline sits at ``col = grid_w`` of its row.
        patches_per_side: ``p``.
        num_tiles: base tile plus anyres tiles.
        grid_shape: ``(grid_h, grid_w)`` of the unpadded anyres patch grid
            (``(0, 0)`` for a single-tile image).
    """

    tile: torch.Tensor
    patch: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    patches_per_side: int
    num_tiles: int
    grid_shape: tuple[int, int]

    @property
    def num_tokens(self) -> int:
        return int(self.tile.shape[0])

    @property
    def is_newline(self) -> torch.Tensor:
        return self.tile == NEWLINE

    @property
    def is_base(self) -> torch.Tensor:
        return self.tile == 0

    @property
    def is_grid(self) -> torch.Tensor:
        return self.tile > 0

    def gather(self, per_tile: torch.Tensor, fill: float = float("-inf")) -> torch.Tensor:
        """Map per-tile values ``[num_tiles, p * p]`` onto the packed tokens ``[N]``.

        Token ``i`` gets ``per_tile[tile[i], patch[i]]``; newline tokens (which
        no vision-encoder patch produced) get ``fill``. Tile patches removed by
        unpadding have no packed token and are simply not read.
        """
        p2 = self.patches_per_side**2
        if per_tile.shape != (self.num_tiles, p2):
            raise ValueError(
                f"per-tile values must have shape ({self.num_tiles}, {p2}), "
                f"got {tuple(per_tile.shape)}"
            )
        flat = per_tile.reshape(-1)
        src = (self.tile.clamp(min=0) * p2 + self.patch.clamp(min=0)).to(flat.device)
        out = flat.float().index_select(0, src)
        return torch.where(self.is_newline.to(flat.device), torch.full_like(out, fill), out)


def _unpadded_window(
    grid_h: int, grid_w: int, image_size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Rows ``[r0, r1)`` and columns ``[c0, c1)`` that LLaVA-NeXT's unpadding keeps.

    Same arithmetic as ``unpad_image`` in HF transformers' LLaVA-NeXT (and the
    original LLaVA code): the resized image is centred in the padded canvas,
    and the symmetric padding ``(canvas - content) // 2`` is cut on both sides.
    """
    height, width = image_size
    if width / height > grid_w / grid_h:
        new_h = int(round(height * (grid_w / width), 7))
        pad = (grid_h - new_h) // 2
        return pad, grid_h - pad, 0, grid_w
    new_w = int(round(width * (grid_h / height), 7))
    pad = (grid_w - new_w) // 2
    return 0, grid_h, pad, grid_w - pad


def llava_next_layout(
    patches_per_side: int,
    tile_grid: tuple[int, int] | None,
    image_size: tuple[int, int],
) -> PackedLayout:
    """Packed layout of one image, as LLaVA-NeXT's "spatial_unpad" packs it.

    Args:
        patches_per_side: ``p`` (24 for CLIP ViT-L/14 at 336 px).
        tile_grid: ``(rows, cols)`` of anyres tiles chosen for the image (HF's
            ``get_anyres_image_grid_shape`` returns ``(rows, cols)``), or None
            for a single-tile image (base tile plus one newline).
        image_size: original ``(height, width)`` in pixels (``image_sizes``).
    """
    p = patches_per_side
    base = torch.arange(p * p)
    tiles = [torch.zeros(p * p, dtype=torch.long)]
    patches, rows, cols = [base], [base // p], [base % p]
    if tile_grid is None:
        nl = torch.tensor([NEWLINE])
        return PackedLayout(
            tile=torch.cat([*tiles, nl]),
            patch=torch.cat([*patches, nl]),
            row=torch.cat([*rows, torch.tensor([0])]),
            col=torch.cat([*cols, torch.tensor([p])]),
            patches_per_side=p,
            num_tiles=1,
            grid_shape=(0, 0),
        )
    tr, tc = tile_grid
    r0, r1, c0, c1 = _unpadded_window(tr * p, tc * p, image_size)
    gh, gw = r1 - r0, c1 - c0
    # One grid row: gw patch tokens, then a newline (encoded at col == gw).
    grow = torch.arange(gh)[:, None].expand(gh, gw + 1)
    gcol = torch.arange(gw + 1)[None, :].expand(gh, gw + 1)
    abs_r, abs_c = grow + r0, (gcol + c0).clamp(max=c1 - 1)
    tile = 1 + (abs_r // p) * tc + abs_c // p
    patch = (abs_r % p) * p + abs_c % p
    newline = gcol == gw
    tiles.append(torch.where(newline, NEWLINE, tile).flatten())
    patches.append(torch.where(newline, NEWLINE, patch).flatten())
    rows.append(grow.flatten())
    cols.append(gcol.flatten())
    return PackedLayout(
        tile=torch.cat(tiles),
        patch=torch.cat(patches),
        row=torch.cat(rows),
        col=torch.cat(cols),
        patches_per_side=p,
        num_tiles=1 + tr * tc,
        grid_shape=(gh, gw),
    )


# --------------------------------------------------------------------------- #
# Selectors
# --------------------------------------------------------------------------- #


def random_select(n: int, k: int, seed: int) -> torch.Tensor:
    """``k`` of ``n`` indices uniformly at random (CPU generator seeded by ``seed``).

    The same ``(n, k, seed)`` always gives the same set on every machine.
    """
    _check_k(k)
    if k >= n:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(n, generator=gen)[:k]).values


def lattice_points(height: int, width: int, m: int) -> torch.Tensor:
    """``m`` cells of a ``height x width`` grid spread evenly, as row-major flat indices.

    A lattice of ``a`` rows by ``b`` columns with ``a / b`` close to
    ``height / width`` and ``a * b >= m`` (the fewest cells that fit), cell
    centres ``floor((i + 0.5) * height / a)``; if the lattice has more than
    ``m`` points, ``m`` of them are taken evenly spaced in row-major order.
    Returned ascending.
    """
    if m <= 0:
        return torch.empty(0, dtype=torch.long)
    if m >= height * width:
        return torch.arange(height * width)
    a = min(height, max(1, round(math.sqrt(m * height / width))))
    b = min(width, math.ceil(m / a))
    a = min(height, math.ceil(m / b))  # b may have been capped at width
    ys = ((torch.arange(a, dtype=torch.float64) + 0.5) * height / a).floor().long()
    xs = ((torch.arange(b, dtype=torch.float64) + 0.5) * width / b).floor().long()
    points = (ys[:, None] * width + xs[None, :]).flatten()
    pick = ((torch.arange(m, dtype=torch.float64) + 0.5) * points.numel() / m).floor().long()
    return torch.sort(points[pick]).values


def grid_select(layout: PackedLayout, k: int) -> torch.Tensor:
    """Uniform spatial subsampling on LLaVA-NeXT's packed layout.

    Why not evenly spaced indices over the packed sequence: the sequence is a
    row-major raster, so a stride that divides the row length picks whole
    columns and misses the rest of the image (e.g. 24 of a 24x24 tile at
    stride 24 is one column). Instead:

    * the budget is split between the base tile and the anyres grid in
      proportion to their patch counts (``k_base = round(k * n_base /
      n_spatial)``, the rest to the grid, each capped at its size);
    * each region gets an evenly spread lattice of its share
      (:func:`lattice_points` on the ``p x p`` base grid and on the unpadded
      anyres grid);
    * newline tokens carry no image content and are only used when ``k``
      exceeds the number of patch tokens (then evenly spaced among them).
    """
    _check_k(k)
    n = layout.num_tokens
    if k >= n:
        return torch.arange(n)
    base_idx = torch.nonzero(layout.is_base).squeeze(1)
    grid_idx = torch.nonzero(layout.is_grid).squeeze(1)
    nl_idx = torch.nonzero(layout.is_newline).squeeze(1)
    n_base, n_grid = base_idx.numel(), grid_idx.numel()
    n_spatial = n_base + n_grid
    spatial_k = min(k, n_spatial)
    k_base = min(n_base, round(spatial_k * n_base / n_spatial))
    k_grid = min(n_grid, spatial_k - k_base)
    k_base = spatial_k - k_grid
    p = layout.patches_per_side
    picked = [base_idx[lattice_points(p, p, k_base)]]
    if k_grid:
        gh, gw = layout.grid_shape
        # Grid tokens in packed order are the grid raster with newlines removed.
        picked.append(grid_idx[lattice_points(gh, gw, k_grid)])
    rest = k - spatial_k
    if rest:
        nl_pick = ((torch.arange(rest) + 0.5) * nl_idx.numel() / rest).floor().long()
        picked.append(nl_idx[nl_pick])
    return torch.sort(torch.cat(picked)).values


def cls_attention_select(
    cls_attn: torch.Tensor, k: int, layout: PackedLayout | None = None
) -> torch.Tensor:
    """VisionZip-style dominant tokens: top-k [CLS] attention, on the packed layout.

    Args:
        cls_attn: the attention the [CLS] query pays to each patch in the
            penultimate CLIP layer (the layer LLaVA takes features from),
            averaged over heads: ``[num_tiles, p * p]`` per tile (tile 0 is the
            base tile, then the anyres tiles in row-major tile order, as the
            vision tower sees them), or ``[N]`` already on the packed tokens.
        layout: maps per-tile values onto the packed tokens (required for a
            per-tile ``cls_attn``): packed token ``i`` gets
            ``cls_attn[tile[i], patch[i]]``.

    Mapping: every patch token has exactly one source patch in one tile;
    patches cut away by unpadding have no packed token and never compete.
    Newline tokens have no [CLS] attention and rank last (they are only kept
    when ``k`` exceeds the patch tokens). Each tile's [CLS] row is its own
    softmax, so scores are on a common scale and the top-k runs over all
    tiles at once (no per-tile quota). VisionZip's "contextual" merged tokens
    are not built: this is the pure attention-ranking baseline.
    """
    if cls_attn.dim() == 2:
        if layout is None:
            raise ValueError("per-tile cls_attn needs the packed layout")
        scores = layout.gather(cls_attn)
    elif cls_attn.dim() == 1:
        scores = cls_attn.float()
    else:
        raise ValueError(f"cls_attn must be 1-D or 2-D, got shape {tuple(cls_attn.shape)}")
    return top_k_ascending(scores, k)


def text_attention_select(attn_last_to_visual: torch.Tensor, k: int) -> torch.Tensor:
    """FastV-style: the visual tokens that the last prompt token(s) attend to most.

    Args:
        attn_last_to_visual: attention weights from the last prompt position(s)
            to the ``N`` visual tokens at a shallow decoder layer (FastV uses
            layer K = 2, the default of the quality harness), shape ``[..., N]``,
            e.g. ``[heads, queries, N]``; averaged over every leading dimension
            (FastV averages over heads for the last token).
    """
    if attn_last_to_visual.dim() < 1:
        raise ValueError("attention must have at least one dimension")
    n = attn_last_to_visual.shape[-1]
    scores = attn_last_to_visual.float().reshape(-1, n).mean(dim=0)
    return top_k_ascending(scores, k)


def diversity_select(features: torch.Tensor, k: int) -> torch.Tensor:
    """Pure diversity: greedy k-center (farthest-point sampling) on cosine distance.

    Start with the token most similar to the mean direction (the most
    "typical" token; deterministic, unlike a random start), then repeatedly
    add the token whose highest cosine similarity to the already chosen set is
    lowest, i.e. the point farthest from its nearest chosen center. Ties go to
    the lower index. Nothing in it knows what the question asks, which is
    what this baseline isolates (TRIO's NMS also spreads tokens out, but in
    saliency order).

    Args:
        features: ``[N, D]`` token features (the projected visual embeddings).
    """
    _check_k(k)
    n = features.shape[0]
    if k >= n:
        return torch.arange(n, device=features.device)
    f = F.normalize(features.float(), dim=-1)
    mean_dir = F.normalize(f.mean(dim=0), dim=0)
    first = int(torch.argmax(f @ mean_dir))  # argmax returns the first maximum
    chosen = torch.zeros(n, dtype=torch.bool, device=features.device)
    chosen[first] = True
    nearest = f @ f[first]  # similarity of each token to its closest center
    for _ in range(k - 1):
        masked = nearest.masked_fill(chosen, float("inf"))
        nxt = int(torch.argmin(masked))  # argmin returns the first minimum
        chosen[nxt] = True
        nearest = torch.maximum(nearest, f @ f[nxt])
    return torch.nonzero(chosen).squeeze(1)
