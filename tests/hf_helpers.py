"""HF-transformers side of the cross-checks: the same weights as vLLM, other code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

from vllm_trio.core import LlamaLayerWeights, Rotary, decoder_layer, rms_norm
from vllm_trio.core.saliency import HeadFn, LayerFn, NormFn


def core_fns(
    model: LlavaNextForConditionalGeneration, layer: int, seq_len: int
) -> tuple[LayerFn, NormFn, HeadFn]:
    """``vllm_trio.core`` callables over HF's weights (what the vLLM side pass runs)."""
    lm = model.model.language_model
    hf = lm.layers[layer]
    a, m = hf.self_attn, hf.mlp
    cfg = lm.config
    w = LlamaLayerWeights(
        input_norm=hf.input_layernorm.weight,
        post_norm=hf.post_attention_layernorm.weight,
        eps=cfg.rms_norm_eps,
        qkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
        o_proj=a.o_proj.weight,
        gate_up=torch.cat([m.gate_proj.weight, m.up_proj.weight]),
        down=m.down_proj.weight,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.hidden_size // cfg.num_attention_heads,
    )
    freqs = torch.arange(seq_len).float()[:, None] * lm.rotary_emb.inv_freq[None].float()
    rotary = Rotary(torch.cat([freqs.cos(), freqs.sin()], dim=-1), is_neox=True)
    positions = torch.arange(seq_len)

    def layer_fn(h: torch.Tensor, qi: torch.Tensor) -> torch.Tensor:
        return decoder_layer(h, w, rotary, positions, qi)

    def norm_fn(x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, lm.norm.weight, cfg.rms_norm_eps)

    def head_fn(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, model.lm_head.weight)

    return layer_fn, norm_fn, head_fn


@dataclass(frozen=True)
class HFPrompt:
    """A prompt as HF's processor expands it (one placeholder per visual token)."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_sizes: torch.Tensor
    image_token_id: int

    @property
    def visual_positions(self) -> torch.Tensor:
        return torch.nonzero(self.input_ids == self.image_token_id).squeeze(1)


def load_hf(ckpt: Path) -> tuple[LlavaNextForConditionalGeneration, object]:
    model = LlavaNextForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(ckpt)


def hf_prompt(model, processor, text: str, image) -> HFPrompt:
    enc = processor(images=image, text=text, return_tensors="pt")
    return HFPrompt(
        input_ids=enc["input_ids"][0],
        pixel_values=enc["pixel_values"],
        image_sizes=enc["image_sizes"],
        image_token_id=model.config.image_token_index,
    )


def hf_hidden_entering(model, p: HFPrompt, layer: int) -> torch.Tensor:
    """Residual stream entering decoder ``layer`` (HF's own forward)."""
    with torch.no_grad():
        out = model(
            input_ids=p.input_ids[None],
            pixel_values=p.pixel_values,
            image_sizes=p.image_sizes,
            output_hidden_states=True,
        )
    return out.hidden_states[layer][0]
