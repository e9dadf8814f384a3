"""TRIO's selection for one prompt: saliency at depth L, then NMS."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .nms import nms_select
from .saliency import HeadFn, LayerFn, NormFn, gradient_saliency


@dataclass(frozen=True)
class TrioParams:
    """Knobs of one selection. Defaults are the reference's."""

    tau: float = 0.8
    num_loss_positions: int = 4
    include_final_position: bool = False


@dataclass(frozen=True)
class Selection:
    """Which visual tokens survive, and why (kept for tests and metrics)."""

    keep: torch.Tensor  # [k] ascending indices into the visual tokens
    saliency: torch.Tensor  # [N] float32 saliency of every visual token


def select_visual_tokens(
    hidden: torch.Tensor,
    visual_index: torch.Tensor,
    k: int,
    layer_fn: LayerFn,
    norm_fn: NormFn,
    head_fn: HeadFn,
    params: TrioParams | None = None,
) -> Selection:
    """Choose ``k`` of the visual rows ``visual_index`` of ``hidden`` ``[S, D]``.

    ``hidden`` enters decoder layer L; ``layer_fn`` runs that layer. The NMS
    features are the same hidden rows (un-normalised residual stream), as in
    the reference.
    """
    params = params or TrioParams()
    saliency = gradient_saliency(
        hidden,
        layer_fn,
        norm_fn,
        head_fn,
        num_positions=params.num_loss_positions,
        include_final=params.include_final_position,
    )
    vis_scores = saliency.index_select(0, visual_index)
    vis_feats = hidden.detach().index_select(0, visual_index)
    keep = nms_select(vis_feats, vis_scores, k, params.tau)
    return Selection(keep=keep, saliency=vis_scores)
