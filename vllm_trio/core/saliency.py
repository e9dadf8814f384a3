"""Gradient saliency from TRIO's layer-local proxy loss (TRIO steps 1-3).

``H`` (hidden states entering decoder layer L for the whole prompt) is made a
leaf; only layer L, the final norm and the LM head run on it; pseudo-labels are
the argmax of those same logits; the loss is float32 cross-entropy averaged
over the last few prompt positions; saliency of token i is ``||dLoss/dH[i]||_2``.

Cost: causal attention means the logits at the last positions depend on every
position's keys/values at layer L but on no other position's query, MLP or
logits, so ``layer_fn`` is asked for outputs at the loss positions only. That
saving is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

#: ``layer_fn(hidden[S, D], query_index[Q]) -> [Q, D]``: decoder layer L's
#: output (residual stream) at rows ``query_index``, attending causally over
#: all ``S`` rows of ``hidden``.
LayerFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NormFn = Callable[[torch.Tensor], torch.Tensor]
HeadFn = Callable[[torch.Tensor], torch.Tensor]


def loss_positions(
    seq_len: int,
    num_positions: int = 4,
    include_final: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Prompt positions whose logits enter the proxy loss.

    Faithful default: the reference shifts logits by one before masking the
    last ``num_positions`` labels, so it uses positions ``S-1-K .. S-2`` and
    leaves the final position out. ``include_final`` uses ``S-K .. S-1``.
    Positions are clamped at 0 for very short prompts.
    """
    if seq_len < 1:
        raise ValueError("seq_len must be >= 1")
    if num_positions < 1:
        raise ValueError("num_positions must be >= 1")
    last = seq_len - 1 if include_final else max(seq_len - 2, 0)
    first = max(last - num_positions + 1, 0)
    return torch.arange(first, last + 1, device=device)


def proxy_loss(
    hidden: torch.Tensor,
    layer_fn: LayerFn,
    norm_fn: NormFn,
    head_fn: HeadFn,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Cross-entropy of layer-local logits against their own argmax."""
    out = layer_fn(hidden, positions)
    logits = head_fn(norm_fn(out)).float()
    labels = logits.detach().argmax(dim=-1)
    return F.cross_entropy(logits, labels)


def gradient_saliency(
    hidden: torch.Tensor,
    layer_fn: LayerFn,
    norm_fn: NormFn,
    head_fn: HeadFn,
    num_positions: int = 4,
    include_final: bool = False,
) -> torch.Tensor:
    """Per-token saliency ``[S]`` (float32) of ``hidden`` ``[S, D]``.

    Works inside ``torch.inference_mode()`` (vLLM's ``execute_model``): the
    leaf is a fresh non-inference tensor and autograd is enabled locally. The
    graph is freed by ``autograd.grad`` before returning.
    """
    with torch.inference_mode(False), torch.enable_grad():
        # Created here: index tensors made under inference mode cannot be
        # saved for backward.
        positions = loss_positions(hidden.shape[0], num_positions, include_final, hidden.device)
        leaf = hidden.detach().clone().requires_grad_(True)
        loss = proxy_loss(leaf, layer_fn, norm_fn, head_fn, positions)
        (grad,) = torch.autograd.grad(loss, leaf)
    return grad.float().norm(dim=-1)


#: ``layer_fn(hidden[B, S, D], query_index[B, Q]) -> [B, Q, D]``: layer L over
#: a right-padded batch of prompts, outputs at each prompt's own rows.
BatchLayerFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def gradient_saliency_batch(
    hidden: torch.Tensor,
    lengths: Sequence[int],
    layer_fn: BatchLayerFn,
    norm_fn: NormFn,
    head_fn: HeadFn,
    num_positions: int = 4,
    include_final: bool = False,
) -> torch.Tensor:
    """Per-token saliency ``[B, S]`` (float32) of a right-padded batch ``[B, S, D]``.

    Prompt ``b`` is the first ``lengths[b]`` rows of ``hidden[b]``. The loss is
    the sum over prompts of each prompt's own :func:`proxy_loss`, and prompts
    never see each other's rows, so each prompt's gradient (hence saliency) is
    its solo one up to summation order; padding rows get 0.
    """
    with torch.inference_mode(False), torch.enable_grad():
        per_item = [loss_positions(n, num_positions, include_final, hidden.device) for n in lengths]
        width = max(p.numel() for p in per_item)
        # Very short prompts have fewer loss rows: pad with a repeat of their
        # last one, which the loss below leaves out.
        query_index = torch.stack(
            [torch.cat([p, p[-1:].expand(width - p.numel())]) for p in per_item]
        )
        leaf = hidden.detach().clone().requires_grad_(True)
        logits = head_fn(norm_fn(layer_fn(leaf, query_index))).float()
        labels = logits.detach().argmax(dim=-1)
        loss = sum(
            F.cross_entropy(logits[b, : p.numel()], labels[b, : p.numel()])
            for b, p in enumerate(per_item)
        )
        (grad,) = torch.autograd.grad(loss, leaf)
    return grad.float().norm(dim=-1)
