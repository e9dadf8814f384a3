"""A plain-PyTorch Llama decoder layer over borrowed weights.

vLLM's own layers cannot be differentiated (their CPU GEMM is a custom op
without a backward, and their attention needs vLLM's forward context and KV
cache), so the side pass runs this forward on the very same weight tensors.
It is also what makes the "queries only at the loss positions" saving possible.
With a ``TensorParallel`` group the weights are one rank's shards and the
layer places the collectives (and their gradients) where vLLM's sharding needs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .tensor_parallel import TensorParallel


@dataclass(frozen=True)
class Rotary:
    """Rotary embedding table in vLLM's layout: ``cos_sin[pos] = [cos | sin]``."""

    cos_sin: torch.Tensor  # [max_pos, rotary_dim]
    is_neox: bool = True

    def cos_sin_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``/``sin`` ``[*positions.shape, rotary_dim / 2]`` of the rows at ``positions``."""
        cs = self.cos_sin.index_select(0, positions.flatten()).view(*positions.shape, -1)
        cos, sin = cs.chunk(2, dim=-1)
        return cos, sin


@dataclass(frozen=True)
class LlamaLayerWeights:
    """One decoder layer's weights (possibly one tensor-parallel shard)."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    eps: float
    qkv: torch.Tensor  # [(Hq + 2 Hkv) * head_dim, D]: q rows, then k, then v
    o_proj: torch.Tensor
    gate_up: torch.Tensor  # [2 I, D]: gate rows, then up rows
    down: torch.Tensor
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, as HF Llama and vLLM do."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool
) -> torch.Tensor:
    """Rotate ``x`` ``[..., T, H, hd]`` by per-row ``cos``/``sin`` ``[..., T, rot/2]``."""
    rot = cos.shape[-1] * 2
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    cos = cos.unsqueeze(-2).to(x.dtype)
    sin = sin.unsqueeze(-2).to(x.dtype)
    if is_neox:
        x1, x2 = x_rot.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([out, x_pass], dim=-1)


def decoder_layer(
    hidden: torch.Tensor,
    w: LlamaLayerWeights,
    rotary: Rotary,
    positions: torch.Tensor,
    query_index: torch.Tensor | None = None,
    tp: TensorParallel | None = None,
) -> torch.Tensor:
    """Residual-stream output of one Llama layer, for one prompt or a padded batch.

    Args:
        hidden: ``[S, D]`` residual stream entering the layer, or ``[B, S, D]``:
            B prompts right-padded to S rows (rows past a prompt's length are
            padding, whatever their content).
        positions: ``[S]`` (``[B, S]``) rotary positions of the rows; any
            in-table value at padding rows.
        query_index: ``[Q]`` (``[B, Q]``) rows whose output is wanted (default:
            all), each a real row of its prompt. Keys and values are computed
            for every row; queries, the MLP and the residual only for these
            rows, which is exact under causal attention.
        tp: the tensor-parallel group when ``w`` holds one rank's shards
            (vLLM's layout: q/k/v heads and gate/up rows split, o_proj and
            down split by input columns); ``hidden`` is the same on every rank.

    Padding needs no mask of its own: with right padding, causal attention at
    a real row only reaches rows before it, which are real, so the causal mask
    is also each prompt's key-padding mask. Padding rows' outputs are junk.
    A single prompt runs as a batch of one (measured bit-identical to the
    former 2-D code, ``tests/test_core_batch.py``).
    """
    if hidden.ndim == 2:
        query = None if query_index is None else query_index.unsqueeze(0)
        out = decoder_layer(hidden.unsqueeze(0), w, rotary, positions.unsqueeze(0), query, tp)
        return out.squeeze(0)
    batch, seq, _ = hidden.shape
    x = rms_norm(hidden, w.input_norm, w.eps)
    if tp is not None:
        x = tp.enter(x)
    if query_index is None:
        x_q, h_q, pos_q = x, hidden, positions
    else:
        x_q, h_q = _rows(x, query_index), _rows(hidden, query_index)
        pos_q = positions.gather(1, query_index)
    q_size = w.num_heads * w.head_dim
    kv_size = w.num_kv_heads * w.head_dim
    wq, wk, wv = w.qkv.split([q_size, kv_size, kv_size], dim=0)
    bq = bk = bv = None
    if w.qkv_bias is not None:
        bq, bk, bv = w.qkv_bias.split([q_size, kv_size, kv_size])
    q = F.linear(x_q, wq, bq).view(batch, -1, w.num_heads, w.head_dim)
    k = F.linear(x, wk, bk).view(batch, seq, w.num_kv_heads, w.head_dim)
    v = F.linear(x, wv, bv).view(batch, seq, w.num_kv_heads, w.head_dim)

    cos_q, sin_q = rotary.cos_sin_at(pos_q)
    cos_k, sin_k = rotary.cos_sin_at(positions)
    q = apply_rotary(q, cos_q, sin_q, rotary.is_neox)
    k = apply_rotary(k, cos_k, sin_k, rotary.is_neox)

    gqa = w.num_heads != w.num_kv_heads
    # SDPA wants [batch, heads, rows, head_dim]: with 3-D inputs PyTorch's CPU
    # dispatch falls back to the math kernel, measured 17x slower for a causal
    # 2,988-token layer (0.90 s vs 0.054 s, bf16, one core).
    q4, k4, v4 = (t.transpose(1, 2) for t in (q, k, v))
    if query_index is None:
        # Full causal prefill: let SDPA skip the masked half.
        attn = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, enable_gqa=gqa)
    else:
        # Causal by row index: row query_index[b, t] sees rows 0..query_index[b, t].
        keys = torch.arange(seq, device=hidden.device)
        mask = (keys[None, None, :] <= query_index[:, :, None]).unsqueeze(1)
        attn = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, enable_gqa=gqa)
    attn = attn.transpose(1, 2).reshape(batch, x_q.shape[1], q_size)
    attn_out = F.linear(attn, w.o_proj)
    if tp is not None:
        attn_out = tp.reduce(attn_out)
    if w.o_bias is not None:
        attn_out = attn_out + w.o_bias
    h = h_q + attn_out

    y = rms_norm(h, w.post_norm, w.eps)
    if tp is not None:
        y = tp.enter(y)
    gate, up = F.linear(y, w.gate_up).chunk(2, dim=-1)
    mlp_out = F.linear(F.silu(gate) * up, w.down)
    if tp is not None:
        mlp_out = tp.reduce(mlp_out)
    return h + mlp_out


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, t]]`` for ``x`` ``[B, S, D]`` and ``index`` ``[B, Q]``."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def lm_head_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    vocab_size: int,
    tp: TensorParallel | None = None,
) -> torch.Tensor:
    """Logits over the real vocabulary ``[..., vocab_size]``.

    ``weight`` may have padding rows past ``vocab_size`` (vLLM pads the LM
    head), and under tensor parallelism it is this rank's contiguous slice of
    the padded rows, as in vLLM's ``ParallelLMHead``.
    """
    if tp is None:
        return F.linear(hidden, weight[:vocab_size])
    logits = tp.gather_last_dim(F.linear(tp.enter(hidden), weight))
    return logits[..., :vocab_size]
