"""Attention weights of a few query rows of one Llama layer, for a training loss.

Supervising where the answer position looks (``evidence``) needs that layer's
attention probabilities at a handful of rows per chat. Asking HF for them means
its eager attention in every layer, for every row; this recomputes only the
rows needed from the layer's own inputs, captured by a forward pre-hook, with
the same projections, rotary embedding and causal softmax, so the model itself
keeps SDPA. ``tests/test_quality_grid.py``
checks it against HF's eager weights with padding and gapped positions.

It assumes right padding and causal attention (the trainer's batches): row
``q`` of a chat sees its keys ``0..q``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


class QueryAttention:
    """Captures one decoder layer's attention inputs on every forward."""

    def __init__(self, layer: nn.Module) -> None:
        self._attn = layer.self_attn
        self._inputs: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._handle = self._attn.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, _module: nn.Module, _args: tuple, kwargs: dict) -> None:
        self._inputs = (kwargs["hidden_states"], kwargs["position_embeddings"])

    def remove(self) -> None:
        self._handle.remove()

    def weights(
        self, rows: Sequence[int], queries: Sequence[int], heads: Sequence[int]
    ) -> list[torch.Tensor]:
        """Attention probabilities ``[len(heads), q + 1]`` of query ``q`` of batch row
        ``b``, for each ``(b, q)``, in the last forward (differentiable)."""
        if self._inputs is None:
            raise RuntimeError("no forward has run through the layer yet")
        hidden, (cos, sin) = self._inputs
        attn, d = self._attn, self._attn.head_dim
        keys_of: dict[int, torch.Tensor] = {}  # a chat's keys, shared by all its answers
        out = []
        for b, q in zip(rows, queries, strict=True):
            c = min(b, cos.shape[0] - 1)  # default position ids give one shared table
            if b not in keys_of:
                keys = attn.k_proj(hidden[b]).view(hidden.shape[1], -1, d).transpose(0, 1)[None]
                _, keys = apply_rotary_pos_emb(keys, keys, cos[c : c + 1], sin[c : c + 1])
                heads_per_key = attn.config.num_attention_heads // keys.shape[1]
                keys_of[b] = keys.repeat_interleave(heads_per_key, dim=1)
            query = attn.q_proj(hidden[b, q : q + 1]).view(1, -1, d).transpose(0, 1)[None]
            query, _ = apply_rotary_pos_emb(
                query, query, cos[c : c + 1, q : q + 1], sin[c : c + 1, q : q + 1]
            )
            scores = (query @ keys_of[b][:, :, : q + 1].transpose(-1, -2))[0, :, 0] * attn.scaling
            out.append(torch.softmax(scores.float(), dim=-1)[list(heads)])
        return out
