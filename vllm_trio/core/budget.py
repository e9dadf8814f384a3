"""How many visual tokens a keep ratio leaves, and multi-stage schedules."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def validate_keep_ratio(value: object, field: str = "keep_ratio") -> float:
    """Return ``value`` as a float in ``(0, 1]`` or raise ``ValueError`` naming ``field``.

    Booleans, strings, None and NaN are refused: a client that sends
    ``"0.5"`` or ``true`` has a bug we should surface, not guess around.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"{field} must be a number in (0, 1], got {type(value).__name__} {value!r}"
        )
    ratio = float(value)
    if not (0.0 < ratio <= 1.0):  # also false for NaN
        raise ValueError(f"{field} must be in (0, 1], got {value!r}")
    return ratio


def num_kept_tokens(num_tokens: int, keep_ratio: float) -> int:
    """Tokens kept out of ``num_tokens`` at ``keep_ratio``.

    Rule: ``k = clamp(floor(r * N + 0.5), 1, N)`` (round half up), so r = 1
    keeps exactly N (stock vLLM, token for token) and any r > 0 keeps at least
    one token. A tiny epsilon absorbs float noise such as 0.111 * 2928.
    """
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    ratio = validate_keep_ratio(keep_ratio)
    k = math.floor(ratio * num_tokens + 0.5 + 1e-9)
    return max(1, min(num_tokens, k))


@dataclass(frozen=True)
class Stage:
    """Keep ``keep`` visual tokens when entering decoder layer ``layer``."""

    layer: int
    keep: int


@dataclass(frozen=True)
class Schedule:
    """Multi-stage pruning as in the reference (``layer_list``/``image_token_list``).

    Stages run at increasing depths with non-increasing budgets; each stage
    selects among the tokens the previous one kept.
    """

    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("a schedule needs at least one stage")
        for prev, cur in zip(self.stages, self.stages[1:], strict=False):
            if cur.layer <= prev.layer:
                raise ValueError("stage layers must be strictly increasing")
            if cur.keep > prev.keep:
                raise ValueError("stage budgets must be non-increasing")
        for st in self.stages:
            if st.layer < 0 or st.keep < 1:
                raise ValueError(f"invalid stage {st}")

    @classmethod
    def from_lists(cls, layers: Sequence[int], keeps: Sequence[int]) -> Schedule:
        if len(layers) != len(keeps):
            raise ValueError("layers and keeps must have the same length")
        return cls(tuple(Stage(int(a), int(b)) for a, b in zip(layers, keeps, strict=True)))

    @classmethod
    def single(cls, layer: int, keep: int) -> Schedule:
        return cls((Stage(layer, keep),))

    def average_kept(self, num_tokens: int, num_layers: int) -> float:
        """Visual tokens per decoder layer, averaged over the whole stack."""
        total, current, prev_layer = 0, num_tokens, 0
        for st in self.stages:
            total += current * (st.layer - prev_layer)
            current, prev_layer = min(current, st.keep), st.layer
        total += current * (num_layers - prev_layer)
        return total / num_layers
