"""``vllm_trio.core`` over an HF-transformers LLaVA-NeXT's weights.

The vLLM side pass runs ``core.decoder_layer`` over vLLM's fused weights.
The cross-checks (tests) and the quality harness run the very same code over
HF's separate projections, so that "TRIO through vLLM" and "TRIO on the HF
path" differ only in who computed the hidden states. This module is the one
place that repacks HF's ``q/k/v`` and ``gate/up`` projections the way vLLM
fuses them. Duck-typed: it reads attributes of HF's Llama modules and does
not import transformers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from vllm_trio.core.llama_layer import LlamaLayerWeights, Rotary, decoder_layer, rms_norm
from vllm_trio.core.saliency import HeadFn, LayerFn, NormFn


def layer_weights_from_hf(layer: Any, config: Any) -> LlamaLayerWeights:
    """One HF ``LlamaDecoderLayer``'s weights, fused as vLLM stores them.

    ``qkv`` is q rows then k then v; ``gate_up`` gate rows then up (vLLM's
    ``QKVParallelLinear`` / ``MergedColumnParallelLinear`` layout); biases
    are carried when the checkpoint has them.
    """
    a, m = layer.self_attn, layer.mlp
    qkv_bias = None
    if a.q_proj.bias is not None:
        qkv_bias = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
    return LlamaLayerWeights(
        input_norm=layer.input_layernorm.weight,
        post_norm=layer.post_attention_layernorm.weight,
        eps=config.rms_norm_eps,
        qkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
        o_proj=a.o_proj.weight,
        gate_up=torch.cat([m.gate_proj.weight, m.up_proj.weight]),
        down=m.down_proj.weight,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=getattr(config, "head_dim", None)
        or config.hidden_size // config.num_attention_heads,
        qkv_bias=qkv_bias,
        o_bias=a.o_proj.bias,
    )


def core_fns_from_hf(model: Any, layer: int, seq_len: int) -> tuple[LayerFn, NormFn, HeadFn]:
    """Layer ``layer``, final norm and LM head of an HF LLaVA-NeXT as core callables.

    Positions are ``0..seq_len-1`` (one prompt, no padding), rotary with HF's
    ``inv_freq`` in the neox layout HF Llama uses.
    """
    lm = model.model.language_model
    cfg = lm.config
    weights = layer_weights_from_hf(lm.layers[layer], cfg)
    freqs = torch.arange(seq_len).float()[:, None] * lm.rotary_emb.inv_freq.float()[None]
    rotary = Rotary(torch.cat([freqs.cos(), freqs.sin()], dim=-1), is_neox=True)
    positions = torch.arange(seq_len)

    def layer_fn(h: torch.Tensor, query_index: torch.Tensor) -> torch.Tensor:
        return decoder_layer(h, weights, rotary, positions, query_index)

    def norm_fn(x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, lm.norm.weight, cfg.rms_norm_eps)

    def head_fn(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, model.lm_head.weight)

    return layer_fn, norm_fn, head_fn
