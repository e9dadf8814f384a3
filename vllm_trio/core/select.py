"""TRIO's selection for one prompt (or a padded batch of them): saliency at depth L, then NMS."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .nms import nms_select
from .saliency import (
    BatchLayerFn,
    HeadFn,
    LayerFn,
    NormFn,
    gradient_saliency,
    gradient_saliency_batch,
)


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


def select_visual_tokens_batch(
    hidden: torch.Tensor,
    lengths: Sequence[int],
    visual_index: Sequence[torch.Tensor],
    ks: Sequence[int],
    layer_fn: BatchLayerFn,
    norm_fn: NormFn,
    head_fn: HeadFn,
    params: TrioParams | None = None,
) -> list[Selection]:
    """:func:`select_visual_tokens` for each prompt of a right-padded batch.

    ``hidden`` ``[B, S, D]`` enters layer L, prompt ``b`` being its first
    ``lengths[b]`` rows with visual rows ``visual_index[b]``, of which it keeps
    ``ks[b]``; ``layer_fn`` runs layer L over the batch. One gradient for the
    whole batch (:func:`gradient_saliency_batch`), then NMS per prompt.
    """
    params = params or TrioParams()
    saliency = gradient_saliency_batch(
        hidden,
        lengths,
        layer_fn,
        norm_fn,
        head_fn,
        num_positions=params.num_loss_positions,
        include_final=params.include_final_position,
    )
    selections = []
    for b, (rows, k) in enumerate(zip(visual_index, ks, strict=True)):
        vis_scores = saliency[b].index_select(0, rows)
        vis_feats = hidden[b].detach().index_select(0, rows)
        keep = nms_select(vis_feats, vis_scores, k, params.tau)
        selections.append(Selection(keep=keep, saliency=vis_scores))
    return selections
