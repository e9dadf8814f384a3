"""Random Llama layer weights and rotary tables for tests of the pure-PyTorch core."""

from __future__ import annotations

import torch

from vllm_trio.core import LlamaLayerWeights, Rotary


def random_layer_weights(
    gen: torch.Generator,
    *,
    dim: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    inter: int,
    scale: float = 0.2,
    dtype: torch.dtype = torch.float32,
) -> LlamaLayerWeights:
    """One decoder layer in vLLM's fused layout (qkv rows, gate then up rows)."""

    def rnd(*shape: int, s: float = scale) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype) * s

    return LlamaLayerWeights(
        input_norm=1 + rnd(dim, s=0.1),
        post_norm=1 + rnd(dim, s=0.1),
        eps=1e-5,
        qkv=rnd((heads + 2 * kv_heads) * head_dim, dim),
        o_proj=rnd(dim, heads * head_dim),
        gate_up=rnd(2 * inter, dim),
        down=rnd(dim, inter),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
    )


def rotary_table(head_dim: int, max_positions: int, dtype: torch.dtype = torch.float32) -> Rotary:
    """NeoX rotary embedding (base 10000) in vLLM's ``[cos | sin]`` layout."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim))
    freqs = torch.arange(max_positions, dtype=dtype)[:, None] * inv_freq[None]
    return Rotary(torch.cat([freqs.cos(), freqs.sin()], dim=-1))
