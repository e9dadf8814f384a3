"""The plain-torch Llama layer against transformers' own ``LlamaDecoderLayer``.

The side pass differentiates ``decoder_layer`` instead of the served model's
layer, so it must compute the same function: checked here against HF on every
row and on query subsets, with vLLM's ``cos|sin`` rotary table built by hand.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRotaryEmbedding,
)

from trio_dev.hf_adapter import layer_weights_from_hf
from vllm_trio.core.llama_layer import (
    LlamaLayerWeights,
    Rotary,
    apply_rotary,
    decoder_layer,
    rms_norm,
)

HIDDEN, HEADS, KV_HEADS, INTER, THETA = 64, 8, 2, 96, 10000.0


def make_config(attn: str, bias: bool = False) -> LlamaConfig:
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=1,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        attention_bias=bias,
        rope_parameters={"rope_type": "default", "rope_theta": THETA},
    )
    cfg._attn_implementation = attn
    return cfg


def make_layer(cfg: LlamaConfig, seed: int) -> LlamaDecoderLayer:
    torch.manual_seed(seed)
    layer = LlamaDecoderLayer(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.ndim > 1:  # keep activations O(1): std 1/sqrt(fan_in)
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
            else:  # norm weights around 1, biases around 0
                p.copy_(torch.randn_like(p) * 0.1 + float("norm" in name))
    return layer


def weights_of(layer: LlamaDecoderLayer, cfg: LlamaConfig) -> LlamaLayerWeights:
    """Repack HF's separate projections the way vLLM stores them (fused)."""
    return layer_weights_from_hf(layer, cfg)


def vllm_cos_sin(rotary_dim: int, max_pos: int = 512, base: float = THETA) -> torch.Tensor:
    """vLLM's ``RotaryEmbedding`` cache: row p is ``[cos(p f) | sin(p f)]``."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
    freqs = torch.einsum("i,j->ij", torch.arange(max_pos, dtype=torch.float), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def hf_forward(
    layer: LlamaDecoderLayer,
    cfg: LlamaConfig,
    hidden: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    x = hidden[None]
    pos = positions[None]
    cos_sin = LlamaRotaryEmbedding(cfg)(x, pos)
    # Causal by row index (what decoder_layer implements), whatever the positions.
    mask = create_causal_mask(
        config=cfg,
        inputs_embeds=x,
        attention_mask=None,
        past_key_values=None,
        position_ids=torch.arange(hidden.shape[0])[None],
    )
    return layer(x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)[0]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("seq_len", [1, 7, 37])
def test_matches_hf_all_rows(attn: str, bias: bool, seq_len: int) -> None:
    cfg = make_config(attn, bias)
    layer = make_layer(cfg, seed=seq_len)
    hidden = torch.randn(seq_len, HIDDEN)
    positions = torch.arange(seq_len) + 3  # not starting at 0
    rotary = Rotary(vllm_cos_sin(HIDDEN // HEADS))
    with torch.no_grad():
        want = hf_forward(layer, cfg, hidden, positions)
        got = decoder_layer(hidden, weights_of(layer, cfg), rotary, positions)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_matches_hf_query_subset(attn: str) -> None:
    cfg = make_config(attn)
    layer = make_layer(cfg, seed=11)
    seq_len = 50
    hidden = torch.randn(seq_len, HIDDEN)
    # Positions need not be contiguous (after pruning they are renumbered, but
    # the layer must not assume it).
    positions = torch.sort(torch.randperm(400)[:seq_len]).values
    rotary = Rotary(vllm_cos_sin(HIDDEN // HEADS))
    w = weights_of(layer, cfg)
    with torch.no_grad():
        want = hf_forward(layer, cfg, hidden, positions)
        for qi in (
            torch.tensor([0]),
            torch.tensor([45, 46, 47, 48]),
            torch.tensor([49, 3, 17]),  # unsorted
            torch.arange(seq_len),
        ):
            got = decoder_layer(hidden, w, rotary, positions, query_index=qi)
            assert got.shape == (qi.numel(), HIDDEN)
            torch.testing.assert_close(got, want[qi], rtol=1e-5, atol=1e-5)


def test_rms_norm_matches_hf() -> None:
    cfg = make_config("eager")
    layer = make_layer(cfg, seed=0)
    x = torch.randn(5, HIDDEN) * 3
    torch.testing.assert_close(
        rms_norm(x, layer.input_layernorm.weight, cfg.rms_norm_eps),
        layer.input_layernorm(x),
    )


def rotate_direct(
    x: torch.Tensor, positions: torch.Tensor, rot: int, base: float, interleaved: bool
) -> torch.Tensor:
    """Rotary as complex multiplication on pairs; the textbook definition."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    angle = positions.double()[:, None] * inv_freq[None]  # [T, rot/2]
    phase = torch.polar(torch.ones_like(angle), angle)[:, None, :]  # [T, 1, rot/2]
    xr = x[..., :rot].double()
    if interleaved:  # GPT-J: pairs (2i, 2i+1)
        z = torch.complex(xr[..., 0::2], xr[..., 1::2]) * phase
        out = torch.stack([z.real, z.imag], dim=-1).flatten(-2)
    else:  # NeoX: pairs (i, i + rot/2)
        half = rot // 2
        z = torch.complex(xr[..., :half], xr[..., half:]) * phase
        out = torch.cat([z.real, z.imag], dim=-1)
    return torch.cat([out, x[..., rot:].double()], dim=-1).float()


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize(("head_dim", "rot"), [(16, 16), (16, 8)])
def test_apply_rotary_direct_formula(is_neox: bool, head_dim: int, rot: int) -> None:
    table = Rotary(vllm_cos_sin(rot), is_neox=is_neox)
    positions = torch.tensor([0, 1, 5, 77, 300])
    x = torch.randn(5, 3, head_dim)
    cos, sin = table.cos_sin_at(positions)
    got = apply_rotary(x, cos, sin, is_neox)
    want = rotate_direct(x, positions, rot, THETA, interleaved=not is_neox)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_gptj_layer_equals_neox_layer_with_permuted_heads() -> None:
    """Interleaved rotary over W equals NeoX rotary over W with q/k rows reordered.

    Both q and k get the same per-head permutation, so attention scores are
    unchanged; this checks the non-NeoX path end to end through the layer.
    """
    cfg = make_config("eager")
    w = weights_of(make_layer(cfg, seed=5), cfg)
    hd = w.head_dim
    # NeoX slot j < hd/2 pairs with j + hd/2; GPT-J pairs (2i, 2i+1).
    perm = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])
    q_rows = (torch.arange(w.num_heads)[:, None] * hd + perm[None]).flatten()
    k_rows = (torch.arange(w.num_kv_heads)[:, None] * hd + perm[None]).flatten()
    q_size, kv_size = w.num_heads * hd, w.num_kv_heads * hd
    wq, wk, wv = w.qkv.split([q_size, kv_size, kv_size])
    permuted = LlamaLayerWeights(**{**w.__dict__, "qkv": torch.cat([wq[q_rows], wk[k_rows], wv])})
    table = vllm_cos_sin(hd)
    hidden = torch.randn(20, HIDDEN)
    positions = torch.arange(20)
    with torch.no_grad():
        gptj = decoder_layer(hidden, w, Rotary(table, is_neox=False), positions)
        neox = decoder_layer(hidden, permuted, Rotary(table, is_neox=True), positions)
    torch.testing.assert_close(gptj, neox, rtol=1e-5, atol=1e-5)


def test_gradients_flow_through_query_only_layer() -> None:
    """The side pass differentiates this layer: grads must match HF's autograd."""
    cfg = make_config("eager")
    layer = make_layer(cfg, seed=9)
    rotary = Rotary(vllm_cos_sin(HIDDEN // HEADS))
    positions = torch.arange(30)
    hidden = torch.randn(30, HIDDEN)
    qi = torch.arange(25, 29)

    h1 = hidden.clone().requires_grad_(True)
    decoder_layer(h1, weights_of(layer, cfg), rotary, positions, qi).pow(2).sum().backward()
    h2 = hidden.clone().requires_grad_(True)
    hf_forward(layer, cfg, h2, positions)[qi].pow(2).sum().backward()
    assert h1.grad is not None and h2.grad is not None
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-4, atol=1e-5)
