"""Baseline selectors of the quality harness: exact results on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from trio_dev.baselines import (
    NEWLINE,
    cls_attention_select,
    diversity_select,
    grid_select,
    lattice_points,
    llava_next_layout,
    random_select,
    text_attention_select,
    top_k_ascending,
)

# p = 3, two anyres tiles side by side (a 3 x 6 patch grid); a 10 x 60 image
# keeps only the middle grid row after unpadding: 9 base + 6 grid + 1 newline.
SMALL = dict(patches_per_side=3, tile_grid=(1, 2), image_size=(10, 60))


def test_top_k_ascending_breaks_ties_by_index_and_returns_ascending() -> None:
    scores = torch.tensor([0.5, 2.0, 0.5, float("-inf"), 2.0, 0.5])
    assert top_k_ascending(scores, 1).tolist() == [1]
    assert top_k_ascending(scores, 3).tolist() == [0, 1, 4]
    assert top_k_ascending(scores, 5).tolist() == [0, 1, 2, 4, 5]
    assert top_k_ascending(scores, 6).tolist() == [0, 1, 2, 3, 4, 5]
    assert top_k_ascending(scores, 60).tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="k must be"):
        top_k_ascending(scores, 0)
    with pytest.raises(ValueError, match="NaN"):
        top_k_ascending(torch.tensor([1.0, float("nan")]), 1)


def test_layout_of_a_small_unpadded_image() -> None:
    lay = llava_next_layout(**SMALL)
    assert lay.num_tokens == 16
    assert lay.num_tiles == 3
    assert lay.grid_shape == (1, 6)
    assert lay.tile.tolist() == [0] * 9 + [1, 1, 1, 2, 2, 2, NEWLINE]
    # The kept grid row is patch row 1 of both tiles.
    assert lay.patch.tolist() == [*range(9), 3, 4, 5, 3, 4, 5, NEWLINE]
    assert lay.row.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] + [0] * 7
    assert lay.col.tolist() == [0, 1, 2] * 3 + [0, 1, 2, 3, 4, 5, 6]


def test_layout_tiles_are_row_major_and_each_row_ends_with_a_newline() -> None:
    # A square image on a 2 x 2 tile grid: nothing is unpadded.
    lay = llava_next_layout(2, (2, 2), (100, 100))
    assert lay.grid_shape == (4, 4)
    assert lay.num_tokens == 4 + 4 * 5
    grid_tiles = lay.tile[4:].view(4, 5)
    assert grid_tiles.tolist() == [
        [1, 1, 2, 2, NEWLINE],
        [1, 1, 2, 2, NEWLINE],
        [3, 3, 4, 4, NEWLINE],
        [3, 3, 4, 4, NEWLINE],
    ]
    assert lay.patch[4:].view(4, 5)[:, :4].tolist() == [
        [0, 1, 0, 1],
        [2, 3, 2, 3],
        [0, 1, 0, 1],
        [2, 3, 2, 3],
    ]


def test_single_tile_layout_is_base_plus_one_newline() -> None:
    lay = llava_next_layout(2, None, (50, 50))
    assert lay.tile.tolist() == [0, 0, 0, 0, NEWLINE]
    assert lay.num_tiles == 1


def test_gather_maps_tile_patches_to_packed_tokens() -> None:
    lay = llava_next_layout(**SMALL)
    per_tile = torch.arange(27, dtype=torch.float32).view(3, 9)  # value = tile * 9 + patch
    got = lay.gather(per_tile, fill=-1.0)
    assert got.tolist() == [*range(9), 12, 13, 14, 21, 22, 23, -1]
    with pytest.raises(ValueError, match="shape"):
        lay.gather(torch.zeros(2, 9))


def test_random_select_is_seeded_sorted_and_distinct() -> None:
    a = random_select(100, 10, seed=7)
    assert a.tolist() == random_select(100, 10, seed=7).tolist()
    assert a.tolist() == sorted(set(a.tolist()))
    assert len(a) == 10 and int(a.min()) >= 0 and int(a.max()) < 100
    expected = torch.randperm(100, generator=torch.Generator().manual_seed(7))[:10]
    assert a.tolist() == sorted(expected.tolist())
    assert a.tolist() != random_select(100, 10, seed=8).tolist()
    assert random_select(5, 9, seed=0).tolist() == [0, 1, 2, 3, 4]


def test_lattice_points_exact() -> None:
    assert lattice_points(4, 4, 4).tolist() == [5, 7, 13, 15]
    assert lattice_points(1, 10, 3).tolist() == [1, 5, 8]
    assert lattice_points(3, 3, 9).tolist() == list(range(9))
    assert lattice_points(3, 3, 0).tolist() == []
    # 3 of a 2 x 2 lattice {0, 2, 6, 8}: evenly spaced picks 0, 6, 8.
    assert lattice_points(3, 3, 3).tolist() == [0, 6, 8]


def test_lattice_points_cover_the_tile_where_a_1d_stride_would_not() -> None:
    pts = lattice_points(24, 24, 24)
    assert len(set(pts.tolist())) == 24
    rows, cols = pts // 24, pts % 24
    assert len(set(cols.tolist())) == 5 and len(set(rows.tolist())) == 5
    # Evenly spaced over the raster (stride 24) would be a single column.
    strided = torch.arange(24) * 24
    assert len(set((strided % 24).tolist())) == 1


def test_grid_select_splits_the_budget_by_region_size() -> None:
    lay = llava_next_layout(**SMALL)
    # k = 5: round(5 * 9 / 15) = 3 base tokens, 2 grid tokens, no newline.
    assert grid_select(lay, 5).tolist() == [0, 6, 8, 10, 13]
    # k = 15 is every patch token; the newline only comes with k = 16.
    assert grid_select(lay, 15).tolist() == list(range(15))
    assert grid_select(lay, 16).tolist() == list(range(16))
    assert grid_select(lay, 1).tolist() == [4]  # the base tile's centre


def test_cls_attention_select_maps_per_tile_scores_and_skips_newlines() -> None:
    lay = llava_next_layout(**SMALL)
    per_tile = torch.zeros(3, 9)
    per_tile[0, 8] = 0.9  # packed 8
    per_tile[2, 4] = 0.8  # packed 13 (tile 2, patch row 1)
    per_tile[1, 0] = 0.99  # cut away by unpadding: must never be chosen
    per_tile[1, 5] = 0.5  # packed 11
    assert cls_attention_select(per_tile, 3, lay).tolist() == [8, 11, 13]
    # Beyond the scored tokens, zeros tie and go by index; the newline is last.
    assert cls_attention_select(per_tile, 15, lay).tolist() == list(range(15))
    assert cls_attention_select(per_tile, 16, lay).tolist() == list(range(16))
    packed = lay.gather(per_tile)
    assert cls_attention_select(packed, 3).tolist() == [8, 11, 13]
    with pytest.raises(ValueError, match="layout"):
        cls_attention_select(per_tile, 3)


def test_text_attention_select_averages_heads_and_queries() -> None:
    attn = torch.tensor(
        [
            [[0.1, 0.6, 0.2, 0.1], [0.4, 0.1, 0.4, 0.1]],  # head 0, two queries
            [[0.1, 0.2, 0.6, 0.1], [0.4, 0.1, 0.2, 0.3]],  # head 1
        ]
    )
    # Means over heads and queries: [0.25, 0.25, 0.35, 0.15].
    assert text_attention_select(attn, 1).tolist() == [2]
    assert text_attention_select(attn, 2).tolist() == [0, 2]  # 0 beats 1 on the tie
    assert text_attention_select(attn[0, 0], 2).tolist() == [1, 2]


def _unit(deg: float, scale: float = 1.0) -> list[float]:
    return [scale * math.cos(math.radians(deg)), scale * math.sin(math.radians(deg))]


def test_diversity_select_is_farthest_point_on_cosine() -> None:
    angles = [0.0, 10.0, 100.0, 180.0, 45.0]
    feats = torch.tensor([_unit(a) for a in angles])
    # Mean direction is about 49 degrees: start at 45; then 180 is farthest;
    # then 100 (nearest centre 55 degrees away) beats 0 (45 away).
    assert diversity_select(feats, 1).tolist() == [4]
    assert diversity_select(feats, 2).tolist() == [3, 4]
    assert diversity_select(feats, 3).tolist() == [2, 3, 4]
    assert diversity_select(feats, 4).tolist() == [0, 2, 3, 4]
    assert diversity_select(feats, 5).tolist() == [0, 1, 2, 3, 4]
    # Cosine distance: the length of a feature does not matter.
    scaled = torch.tensor([_unit(a, s) for a, s in zip(angles, [3, 0.1, 7, 2, 0.5], strict=True)])
    assert diversity_select(scaled, 3).tolist() == [2, 3, 4]


def test_selectors_keep_everything_when_k_covers_n() -> None:
    lay = llava_next_layout(**SMALL)
    n = lay.num_tokens
    assert grid_select(lay, n + 3).tolist() == list(range(n))
    assert diversity_select(torch.randn(n, 4), n).tolist() == list(range(n))
    assert text_attention_select(torch.rand(2, n), n).tolist() == list(range(n))
    for fn in (lambda: grid_select(lay, 0), lambda: diversity_select(torch.randn(3, 2), 0)):
        with pytest.raises(ValueError, match="k must be"):
            fn()
