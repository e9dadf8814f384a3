"""Keep-ratio arithmetic, schedules, and the optional vision-encoder stage."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from trio_dev.vision_stage import merge_dropped, vision_stage_select, window_topk
from vllm_trio.core.budget import Schedule, Stage, num_kept_tokens, validate_keep_ratio

# --------------------------------------------------------------------------- budget


def exact_round_half_up(ratio_str: str, n: int) -> int:
    k = math.floor(Fraction(ratio_str) * n + Fraction(1, 2))
    return max(1, min(n, k))


def test_num_kept_tokens_examples() -> None:
    assert num_kept_tokens(2928, 0.111) == 325  # 324.99... in floats
    assert num_kept_tokens(576, 1.0) == 576
    assert num_kept_tokens(1, 1.0) == 1
    assert num_kept_tokens(3, 0.5) == 2  # 1.5 rounds up
    assert num_kept_tokens(10, 0.25) == 3  # 2.5 rounds up
    assert num_kept_tokens(10, 0.24) == 2  # 2.4 rounds down
    assert num_kept_tokens(5, 0.7) == 4  # 0.7 * 5 = 3.4999999999999996 in floats
    assert num_kept_tokens(1000, 1e-9) == 1  # never zero
    assert num_kept_tokens(1, 0.1) == 1
    assert num_kept_tokens(576, 1) == 576  # int ratio accepted


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 64, 576, 2144, 2928])
def test_num_kept_tokens_round_half_up_exactly(n: int) -> None:
    """For every ratio with three decimals, the float rule equals exact arithmetic."""
    for i in range(1, 1001):
        ratio = f"{i / 1000:.3f}"
        assert num_kept_tokens(n, float(ratio)) == exact_round_half_up(ratio, n), ratio


def test_num_kept_tokens_rejects_bad_counts() -> None:
    for n in (0, -3):
        with pytest.raises(ValueError, match="num_tokens"):
            num_kept_tokens(n, 0.5)
    with pytest.raises(ValueError, match="keep_ratio"):
        num_kept_tokens(10, 0.0)


@pytest.mark.parametrize(
    "value",
    [
        0,
        0.0,
        -0.1,
        -1,
        1.0000001,
        2,
        float("nan"),
        float("inf"),
        float("-inf"),
        "0.5",
        "",
        None,
        True,
        False,
        [0.5],
        complex(0.5, 0),
    ],
)
def test_validate_keep_ratio_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="my_field"):
        validate_keep_ratio(value, field="my_field")
    with pytest.raises(ValueError, match="keep_ratio"):
        validate_keep_ratio(value)


@pytest.mark.parametrize("value", [1, 1.0, 0.5, 0.111, 1e-6])
def test_validate_keep_ratio_accepts(value: float) -> None:
    out = validate_keep_ratio(value)
    assert isinstance(out, float) and out == float(value)


def test_schedule_validation() -> None:
    with pytest.raises(ValueError):
        Schedule(())
    with pytest.raises(ValueError, match="increasing"):
        Schedule.from_lists([2, 2], [10, 5])
    with pytest.raises(ValueError, match="increasing"):
        Schedule.from_lists([5, 2], [10, 5])
    with pytest.raises(ValueError, match="non-increasing"):
        Schedule.from_lists([1, 5], [10, 20])
    with pytest.raises(ValueError, match="invalid stage"):
        Schedule.single(-1, 10)
    with pytest.raises(ValueError, match="invalid stage"):
        Schedule.single(3, 0)
    with pytest.raises(ValueError, match="same length"):
        Schedule.from_lists([1, 2], [10])
    s = Schedule.from_lists([0, 4], [10, 10])  # equal budgets are allowed
    assert s.stages == (Stage(0, 10), Stage(4, 10))


def test_average_kept_reference_llava15() -> None:
    """The reference's "[92, 54, 22] at [1, 10, 15]" averages 64 of 576 over 32 layers.

    The reference's ``image_token_list`` prepends the initial 576 (layer 0 sees
    all tokens; pruning happens entering layer 1), which ``average_kept``
    models as the tokens before the first stage:
    (576*1 + 92*9 + 54*5 + 22*17) / 32 = 64.
    """
    sched = Schedule.from_lists([1, 10, 15], [92, 54, 22])
    assert sched.average_kept(576, 32) == 64.0
    assert (576 * 1 + 92 * 9 + 54 * 5 + 22 * 17) / 32 == 64.0


def test_average_kept_other_cases() -> None:
    assert Schedule.single(0, 64).average_kept(576, 32) == 64.0
    assert Schedule.single(16, 32).average_kept(576, 32) == (576 * 16 + 32 * 16) / 32
    # A budget above N keeps N.
    assert Schedule.single(0, 1000).average_kept(576, 32) == 576.0
    assert (
        Schedule.from_lists([0, 8], [600, 100]).average_kept(576, 32) == (576 * 8 + 100 * 24) / 32
    )


# ---------------------------------------------------------------------- vision stage


def naive_window_topk(
    scores: torch.Tensor, grid: tuple[int, int], per_window: int, window: int
) -> list[int]:
    h, w = grid
    picked: list[int] = []
    for r0 in range(0, h, window):
        for c0 in range(0, w, window):
            idx = [
                r * w + c
                for r in range(r0, min(r0 + window, h))
                for c in range(c0, min(c0 + window, w))
            ]
            idx.sort(key=lambda i: (-float(scores[i]), i))
            picked += idx[:per_window]
    return sorted(picked)


@pytest.mark.parametrize(
    ("grid", "per_window", "window"),
    [
        ((24, 24), 3, 6),
        ((24, 24), 1, 6),
        ((24, 24), 36, 6),
        ((12, 18), 5, 6),
        ((10, 14), 4, 6),
        ((10, 14), 40, 6),
        ((7, 5), 2, 3),
        ((1, 1), 1, 6),
        ((24, 24), 0, 6),
    ],
)
@pytest.mark.parametrize("ties", [False, True])
def test_window_topk_matches_naive(
    grid: tuple[int, int], per_window: int, window: int, ties: bool
) -> None:
    gen = torch.Generator().manual_seed(grid[0] * 100 + per_window)
    n = grid[0] * grid[1]
    scores = (
        torch.randint(0, 4, (n,), generator=gen).float() if ties else torch.rand(n, generator=gen)
    )
    got = window_topk(scores, grid, per_window, window)
    assert got.tolist() == naive_window_topk(scores, grid, per_window, window)


def test_window_topk_rejects_wrong_size() -> None:
    with pytest.raises(ValueError):
        window_topk(torch.rand(10), (3, 3), 1)


def test_vision_stage_24x24_budget_96() -> None:
    gen = torch.Generator().manual_seed(0)
    shallow = torch.rand(576, generator=gen)
    deep = torch.rand(576, generator=gen)
    keep = vision_stage_select(shallow, deep, (24, 24), 96)
    assert keep.tolist() == sorted(set(keep.tolist()))
    assert keep.numel() == 96
    local = window_topk(shallow, (24, 24), 3)
    assert local.numel() == 48
    # 3 per 6x6 window.
    rows, cols = local // 24, local % 24
    counts = torch.bincount((rows // 6) * 4 + cols // 6, minlength=16)
    assert counts.tolist() == [3] * 16
    # The other 48: global top-k of the deep map among the rest, disjoint from local.
    global_part = sorted(set(keep.tolist()) - set(local.tolist()))
    assert len(global_part) == 48
    assert set(local.tolist()) <= set(keep.tolist())
    masked = deep.clone()
    masked[local] = -1.0
    assert global_part == sorted(torch.topk(masked, 48).indices.tolist())


def test_vision_stage_adversarial_overlap_and_budget_edges() -> None:
    # The deep map prefers exactly the local picks: global must still add new ones.
    shallow = torch.rand(576, generator=torch.Generator().manual_seed(1))
    local = window_topk(shallow, (24, 24), 3)
    deep = torch.zeros(576)
    deep[local] = 1.0
    keep = vision_stage_select(shallow, deep, (24, 24), 96)
    assert keep.numel() == 96 and len(set(keep.tolist())) == 96
    assert vision_stage_select(shallow, deep, (24, 24), 576).tolist() == list(range(576))
    assert vision_stage_select(shallow, deep, (24, 24), 1000).tolist() == list(range(576))


@pytest.mark.parametrize("budget", [10, 31, 64, 96, 100, 200, 575])
def test_vision_stage_count_drops_window_remainder(budget: int) -> None:
    """As in the reference, ``local // num_windows`` per window: the remainder is lost.

    So a tile may keep fewer than ``budget`` tokens (budget 10 keeps 5, 100
    keeps 98): whoever sizes the placeholders must use this same count.
    """
    gen = torch.Generator().manual_seed(budget)
    keep = vision_stage_select(
        torch.rand(576, generator=gen), torch.rand(576, generator=gen), (24, 24), budget
    )
    local = budget // 2
    expected = (local // 16) * 16 + (budget - local)
    assert keep.numel() == len(set(keep.tolist())) == expected


def naive_merge(features: torch.Tensor, keep: list[int]) -> torch.Tensor:
    groups: dict[int, list[torch.Tensor]] = {t: [features[t].double()] for t in keep}
    for j in range(features.shape[0]):
        if j in keep:
            continue
        sims = [
            float(F.cosine_similarity(features[j].double(), features[t].double(), dim=0))
            for t in keep
        ]
        best = keep[max(range(len(keep)), key=lambda i: (sims[i], -i))]
        groups[best].append(features[j].double())
    return torch.stack([torch.stack(groups[t]).mean(0) for t in keep]).float()


@pytest.mark.parametrize("seed", range(5))
def test_merge_dropped_matches_naive(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    n = 40
    features = torch.randn(n, 16, generator=gen)
    keep = torch.sort(torch.randperm(n, generator=gen)[: 5 + seed]).values
    got = merge_dropped(features, keep)
    torch.testing.assert_close(got, naive_merge(features, keep.tolist()), rtol=1e-5, atol=1e-6)


def test_merge_dropped_edges() -> None:
    features = torch.randn(6, 4)
    torch.testing.assert_close(merge_dropped(features, torch.arange(6)), features)
    one = merge_dropped(features, torch.tensor([2]))
    torch.testing.assert_close(one, features.mean(0, keepdim=True))
    half = merge_dropped(features.bfloat16(), torch.tensor([0, 3]))
    assert half.dtype == torch.bfloat16 and half.shape == (2, 4)
