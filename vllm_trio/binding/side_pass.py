"""TRIO's side pass over the weights of vLLM's Llama language model.

Why not call vLLM's layers: their CPU GEMM is a custom op without a backward,
their attention needs vLLM's forward context and KV cache, and on the CPU
build vLLM even drops a linear layer's ``weight`` after packing it for its
GEMM kernel. So at model construction we keep references to the parameter
tensors of decoder layers ``0..L`` (the very tensors the loader fills in
place), and run the plain-PyTorch layer from ``vllm_trio.core`` over them. On
GPU these are the same tensors vLLM uses (no copy); on the CPU build the
references keep ``L + 1`` layers' unpacked weights alive next to vLLM's packed
copy.

Under tensor parallelism the references are this rank's shards: every rank
runs the side pass on the same prompt with ``vllm_trio.core.TensorParallel``
placing the collectives (and their conjugate gradients), so each rank ends up
with the saliency the unsharded model would give.

Several prompts (the images one ``embed_multimodal`` call encodes) can be
scored in one batched pass (:meth:`LlamaSidePass.select_batch`): right-padded
to the longest, each with its own positions; the rotary tables of prompts
whose family gives each prompt its own (M-RoPE) are concatenated, so the
batch indexes one table.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ..core import (
    LlamaLayerWeights,
    Rotary,
    Selection,
    TensorParallel,
    TrioParams,
    decoder_layer,
    lm_head_logits,
    pad_rows,
    rms_norm,
    select_visual_tokens,
    select_visual_tokens_batch,
)
from ..core.saliency import HeadFn, LayerFn, NormFn


class _LayerRefs:
    """Parameter references of one vLLM ``LlamaDecoderLayer``, taken before loading."""

    def __init__(self, layer: nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.input_norm = layer.input_layernorm.weight
        self.post_norm = layer.post_attention_layernorm.weight
        self.eps = float(layer.input_layernorm.variance_epsilon)
        self.qkv = attn.qkv_proj.weight
        self.qkv_bias = getattr(attn.qkv_proj, "bias", None)
        self.o_proj = attn.o_proj.weight
        self.o_bias = getattr(attn.o_proj, "bias", None)
        self.gate_up = mlp.gate_up_proj.weight
        self.down = mlp.down_proj.weight
        self.num_heads = int(attn.num_heads)
        self.num_kv_heads = int(attn.num_kv_heads)
        self.head_dim = int(attn.head_dim)
        self.rotary_module = attn.rotary_emb

    def weights(self) -> LlamaLayerWeights:
        return LlamaLayerWeights(
            input_norm=self.input_norm.data,
            post_norm=self.post_norm.data,
            eps=self.eps,
            qkv=self.qkv.data,
            o_proj=self.o_proj.data,
            gate_up=self.gate_up.data,
            down=self.down.data,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            # vLLM's CPU build keeps linear biases in float32 next to bfloat16
            # weights (Qwen2's q/k/v bias); the plain layer wants one dtype.
            qkv_bias=None if self.qkv_bias is None else self.qkv_bias.data.to(self.qkv.dtype),
            o_bias=None if self.o_bias is None else self.o_bias.data.to(self.o_proj.dtype),
        )

    def rotary(self) -> Rotary:
        rope = self.rotary_module
        return Rotary(cos_sin=rope.cos_sin_cache, is_neox=bool(rope.is_neox_style))


class LlamaSidePass:
    """Scores visual tokens with layers ``0..depth`` of a vLLM ``LlamaForCausalLM``."""

    def __init__(
        self,
        language_model: nn.Module,
        depth: int,
        vocab_size: int,
        tp: TensorParallel | None = None,
    ) -> None:
        layers = language_model.model.layers
        if depth >= len(layers):
            raise ValueError(
                f"trio_depth={depth} must be smaller than the number of decoder layers "
                f"({len(layers)})"
            )
        self.depth = depth
        self._layers = [_LayerRefs(layers[i]) for i in range(depth + 1)]
        self._norm = language_model.model.norm
        self._lm_head = language_model.lm_head
        self._vocab_size = vocab_size
        self._tp = tp

    def rotary_at(
        self, refs: _LayerRefs, positions: torch.Tensor | None, seq_len: int, device
    ) -> tuple[Rotary, torch.Tensor]:
        """The rotary table and row positions of a ``seq_len``-row prompt.

        ``positions`` (the family's, e.g. M-RoPE's 3-row ones) is None for a
        plain prompt: row ``i`` at position ``i``. Families with other position
        schemes override this (``qwen2_5_vl.Qwen2SidePass``).
        """
        if positions is None:
            positions = torch.arange(seq_len, device=device)
        return refs.rotary(), positions

    def batch_rotary_at(
        self, refs: _LayerRefs, positions: Sequence[torch.Tensor | None], lengths: list[int], device
    ) -> tuple[Rotary, torch.Tensor]:
        """:meth:`rotary_at` of several prompts as one table and ``[B, S_max]`` rows.

        Prompts sharing one table (plain positions) index it; per-prompt tables
        (M-RoPE) are concatenated and each prompt's rows offset into its part.
        Padding rows point at row 0.
        """
        parts = [
            self.rotary_at(refs, p, n, device) for p, n in zip(positions, lengths, strict=True)
        ]
        tables = [rotary for rotary, _ in parts]
        if all(t.cos_sin is tables[0].cos_sin for t in tables):
            return tables[0], pad_rows([rows for _, rows in parts])
        offsets = torch.tensor([0, *(t.cos_sin.shape[0] for t in tables[:-1])]).cumsum(0)
        table = Rotary(torch.cat([t.cos_sin for t in tables]), is_neox=tables[0].is_neox)
        return table, pad_rows([rows + int(o) for (_, rows), o in zip(parts, offsets, strict=True)])

    def hidden_at_depth(
        self, embeds: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Residual stream entering layer ``depth`` (forward only, full prompt)."""
        hidden = embeds
        with torch.no_grad():
            for refs in self._layers[: self.depth]:
                rotary, rows = self.rotary_at(refs, positions, embeds.shape[0], embeds.device)
                hidden = decoder_layer(hidden, refs.weights(), rotary, rows, tp=self._tp)
        return hidden

    def _scoring_fns(
        self, weights: LlamaLayerWeights, rotary: Rotary, positions: torch.Tensor
    ) -> tuple[LayerFn, NormFn, HeadFn]:
        """Layer ``depth``, the final norm and the LM head, as the saliency wants them."""
        norm_w, norm_eps = self._norm.weight.data, float(self._norm.variance_epsilon)
        head_w, tp = self._lm_head.weight.data, self._tp

        def layer_fn(h: torch.Tensor, query_index: torch.Tensor) -> torch.Tensor:
            return decoder_layer(h, weights, rotary, positions, query_index, tp=tp)

        def norm_fn(h: torch.Tensor) -> torch.Tensor:
            return rms_norm(h, norm_w, norm_eps)

        def head_fn(h: torch.Tensor) -> torch.Tensor:
            return lm_head_logits(h, head_w, self._vocab_size, tp)

        return layer_fn, norm_fn, head_fn

    def select(
        self,
        embeds: torch.Tensor,
        visual_index: torch.Tensor,
        k: int,
        params: TrioParams,
        positions: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
    ) -> Selection:
        """Keep ``k`` of the rows ``visual_index`` of the prompt embeddings ``embeds``.

        ``positions``: the family's positions of the rows (None: ``0..S-1``).
        ``hidden`` is :meth:`hidden_at_depth` of ``embeds`` when the caller already
        has it (layer mode hands those states over, so they are computed once).
        """
        if hidden is None:
            hidden = self.hidden_at_depth(embeds, positions)
        refs = self._layers[self.depth]
        weights = refs.weights()
        rotary, positions = self.rotary_at(refs, positions, embeds.shape[0], embeds.device)
        layer_fn, norm_fn, head_fn = self._scoring_fns(weights, rotary, positions)
        return select_visual_tokens(hidden, visual_index, k, layer_fn, norm_fn, head_fn, params)

    def select_batch(
        self,
        embeds: Sequence[torch.Tensor],
        visual_index: Sequence[torch.Tensor],
        ks: Sequence[int],
        params: TrioParams,
        positions: Sequence[torch.Tensor | None],
    ) -> tuple[list[Selection], list[torch.Tensor]]:
        """:meth:`select` of several prompts in one batched pass.

        Returns each prompt's selection and its (unpadded) states entering
        layer ``depth``, as :meth:`hidden_at_depth` gives them for one prompt
        up to summation order.
        """
        lengths = [e.shape[0] for e in embeds]
        device = embeds[0].device
        hidden = pad_rows(embeds)
        with torch.no_grad():
            for refs in self._layers[: self.depth]:
                rotary, rows = self.batch_rotary_at(refs, positions, lengths, device)
                hidden = decoder_layer(hidden, refs.weights(), rotary, rows, tp=self._tp)
        refs = self._layers[self.depth]
        weights = refs.weights()
        rotary, rows = self.batch_rotary_at(refs, positions, lengths, device)
        layer_fn, norm_fn, head_fn = self._scoring_fns(weights, rotary, rows)

        selections = select_visual_tokens_batch(
            hidden, lengths, visual_index, ks, layer_fn, norm_fn, head_fn, params
        )
        return selections, [hidden[b, :n] for b, n in enumerate(lengths)]
