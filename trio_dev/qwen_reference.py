"""HF-transformers oracle for TRIO on Qwen2.5-VL (one image per prompt).

The Qwen2.5-VL counterpart of ``trio_dev.reference``, for the cross-checks
of the vLLM binding: everything here runs HF's own code (the vision tower,
``get_rope_index`` for the 3-row M-RoPE positions, the decoder layers with
HF's rotary and causal mask, the final norm and LM head), never
``vllm_trio.core``'s plain layer; only the NMS is shared.

* :func:`select_hf`: the proxy loss at layer ``L`` over every row, its
  gradient at the visual rows, NMS: the kept indices (TRIO at the input with
  the selection scored at depth ``L``, what the vLLM binding does).
* :func:`pruned_logits_hf`: the next-token logits of the pruned prompt (text +
  the kept visual rows) with the kept rows' original positions and the text's
  unpruned positions, as HF gives them when the same rows are dropped.
* :func:`core_fns_qwen`: ``vllm_trio.core`` callables over HF's weights with a
  per-row M-RoPE table, for the "pure-PyTorch module" side of the checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.masking_utils import create_causal_mask

from vllm_trio.core import Rotary, TrioParams, decoder_layer, rms_norm
from vllm_trio.core.mrope import mrope_cos_sin
from vllm_trio.core.nms import nms_select

from .hf_adapter import layer_weights_from_hf
from .reference import loss_position_mask

_IGNORE = -100


@dataclass(frozen=True)
class QwenPrompt:
    """One prompt as HF's processor expands it, with HF's embeddings and positions."""

    input_ids: torch.Tensor  # [S]
    embeds: torch.Tensor  # [S, D]
    positions: torch.Tensor  # [3, S]
    visual_rows: torch.Tensor  # [N] rows of the image tokens


def qwen_prompt(model: Any, processor: Any, text: str, image: Any) -> QwenPrompt:
    enc = processor(images=image, text=text, return_tensors="pt")
    ids = enc["input_ids"]
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        feats = model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"])
        feats = torch.cat(feats.pooler_output).to(embeds.dtype)
        mask = ids == model.config.image_token_id
        embeds = embeds.masked_scatter(mask[..., None].expand_as(embeds), feats)
        positions, _ = model.model.get_rope_index(
            ids, enc.get("mm_token_type_ids"), enc["image_grid_thw"]
        )
    return QwenPrompt(
        input_ids=ids[0],
        embeds=embeds[0],
        positions=positions[:, 0],
        visual_rows=torch.nonzero(mask[0]).squeeze(1),
    )


def _layer(model: Any, index: int, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    lm = model.model.language_model
    x = hidden[None]
    pos = positions[:, None, :]
    # No position ids for the mask, as HF's own forward with 3-row positions:
    # the repeated temporal positions of an image would read as packed sequences.
    mask = create_causal_mask(
        config=lm.config,
        inputs_embeds=x,
        attention_mask=None,
        past_key_values=None,
        position_ids=None,
    )
    rope = lm.rotary_emb(x, pos)
    return lm.layers[index](x, attention_mask=mask, position_embeddings=rope)[0]


def hidden_entering(model: Any, p: QwenPrompt, layer: int) -> torch.Tensor:
    """Residual stream entering decoder ``layer`` (HF's layers, full prompt)."""
    hidden = p.embeds
    with torch.no_grad():
        for index in range(layer):
            hidden = _layer(model, index, hidden, p.positions)
    return hidden


def select_hf(
    model: Any, p: QwenPrompt, layer: int, k: int, params: TrioParams | None = None
) -> torch.Tensor:
    """TRIO's kept visual indices, the proxy loss computed by HF's layer ``layer``."""
    params = params or TrioParams()
    hidden = hidden_entering(model, p, layer)
    lm = model.model.language_model
    rows = loss_position_mask(
        hidden.shape[0], params.num_loss_positions, params.include_final_position
    )
    with torch.enable_grad():
        leaf = hidden.detach().clone().requires_grad_(True)
        out = _layer(model, layer, leaf, p.positions)
        logits = model.lm_head(lm.norm(out)).float()
        pseudo = logits.detach().argmax(dim=-1)
        labels = torch.where(rows, pseudo, torch.full_like(pseudo, _IGNORE))
        loss = F.cross_entropy(logits, labels, ignore_index=_IGNORE)
        (grad,) = torch.autograd.grad(loss, leaf)
    scores = grad.float().norm(dim=-1)[p.visual_rows]
    return nms_select(hidden.detach()[p.visual_rows], scores, k, params.tau)


def pruned_logits_hf(model: Any, p: QwenPrompt, keep: torch.Tensor) -> torch.Tensor:
    """Next-token logits ``[V]`` of the prompt with only the visual rows ``keep`` left."""
    rows = torch.ones(p.embeds.shape[0], dtype=torch.bool)
    rows[p.visual_rows] = False
    rows[p.visual_rows[keep]] = True
    lm = model.model.language_model
    with torch.no_grad():
        out = lm(inputs_embeds=p.embeds[rows][None], position_ids=p.positions[:, rows][:, None])
        return model.lm_head(out.last_hidden_state[0, -1])


def core_fns_qwen(model: Any, layer: int, positions: torch.Tensor):
    """``vllm_trio.core`` layer/norm/head callables over HF's weights, M-RoPE positions."""
    lm = model.model.language_model
    cfg = lm.config
    weights = layer_weights_from_hf(lm.layers[layer], cfg)
    max_pos = int(positions.max()) + 1
    freqs = torch.arange(max_pos).float()[:, None] * lm.rotary_emb.inv_freq.float()[None]
    table = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    section = list(cfg.rope_parameters["mrope_section"])
    rotary = Rotary(mrope_cos_sin(table, positions, section), is_neox=True)
    rows = torch.arange(positions.shape[1])

    def layer_fn(h: torch.Tensor, query_index: torch.Tensor) -> torch.Tensor:
        return decoder_layer(h, weights, rotary, rows, query_index)

    def norm_fn(x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, lm.norm.weight, cfg.rms_norm_eps)

    def head_fn(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, model.lm_head.weight)

    return layer_fn, norm_fn, head_fn
