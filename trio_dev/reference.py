"""HF-transformers reference path: TRIO pruning *inside* the language model.

This is the oracle the vLLM binding and the quality harness are measured
against. It follows the paper's code (``LlamaModel.forward_x`` and
``layer_prune`` in ocy1/TRIO): decoder layers ``0..L-1`` run over the full
prompt; entering layer ``L`` the visual tokens are scored with HF's own layer
``L`` (the proxy loss), NMS picks ``k`` of them, the others are dropped from
the sequence and positions are renumbered ``0..S'-1``; later stages repeat
this on the survivors. Pruning at ``L > 0`` is therefore *not* the same as
pruning at the input (kept tokens have attended to every token in the layers
below ``L``), which is what the vLLM binding does; the two are compared by
the quality harness.

Independence: scoring deliberately uses HF's decoder layer, rotary embedding,
mask builder, final norm and LM head over *all* positions, and builds the
loss mask the way the reference does, instead of ``vllm_trio.core``'s plain
layer and query-only shortcut. Only the NMS (``core.nms.nms_select``, itself
tested against the reference's greedy loop) is shared. Nothing here imports
vLLM.

Scope: one prompt (no batch), all image placeholder tokens of the prompt
(every anyres tile, the base image and the image-newline tokens, of every
image) form one pool of visual tokens with one budget per stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import LlavaNextForConditionalGeneration
from transformers.masking_utils import create_causal_mask

from vllm_trio.core.budget import Schedule
from vllm_trio.core.nms import nms_select
from vllm_trio.core.select import TrioParams

_IGNORE = -100
_DEFAULT_PARAMS = TrioParams()


@dataclass(frozen=True)
class ReferenceResult:
    """Outcome of one pruned prefill.

    ``kept_positions[i]`` indexes the visual tokens that *entered* stage ``i``
    (stage 0: all of them, in prompt order; stage ``i > 0``: the survivors of
    stage ``i - 1``), ascending. ``saliency[i]`` is the score of those tokens,
    or None when the stage kept everything and nothing had to be scored.
    """

    logits_last: torch.Tensor  # [V], the next-token logits after the prompt
    kept_positions: list[torch.Tensor]
    visual_positions: torch.Tensor  # [N] positions of image tokens in input_ids
    saliency: list[torch.Tensor | None]

    def kept_visual_positions(self) -> torch.Tensor:
        """Prompt positions of the visual tokens that survive every stage."""
        surviving = self.visual_positions
        for kept in self.kept_positions:
            surviving = surviving[kept]
        return surviving


def build_inputs_embeds(
    model: LlavaNextForConditionalGeneration,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    image_sizes: torch.Tensor,
) -> torch.Tensor:
    """Prompt embeddings ``[S, D]`` exactly as ``LlavaNextModel.forward`` builds them.

    ``input_ids`` ``[S]`` must already hold one image placeholder per visual
    token (what ``LlavaNextProcessor`` emits).
    """
    ids = input_ids[None]
    embeds = model.get_input_embeddings()(ids)
    image_out = model.model.get_image_features(pixel_values, image_sizes, return_dict=True)
    features = torch.cat(image_out.pooler_output, dim=0).to(embeds.device, embeds.dtype)
    mask = model.model.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=features)
    return embeds.masked_scatter(mask, features)[0]


def loss_position_mask(seq_len: int, num_positions: int, include_final: bool) -> torch.Tensor:
    """Boolean ``[S]``: positions whose logits enter the proxy loss.

    Written the way the reference builds it: logits are shifted by one (the
    final position has no label) and the last ``num_positions`` of the shifted
    rows are marked, clamped at 0. ``include_final`` marks the last
    ``num_positions`` rows of the unshifted logits instead.
    """
    usable = seq_len if include_final else seq_len - 1
    mask = torch.zeros(seq_len, dtype=torch.bool)
    if usable <= 0:  # a one-token prompt: only position 0 exists
        mask[0] = True
        return mask
    for t in range(num_positions):
        mask[max(0, usable - 1 - t)] = True
    return mask


class _Stack:
    """HF's language-model modules, and one layer call with HF's rotary and mask."""

    def __init__(self, model: LlavaNextForConditionalGeneration) -> None:
        lm = model.model.language_model
        self.config = lm.config
        self.layers = lm.layers
        self.norm = lm.norm
        self.rotary = lm.rotary_emb
        self.lm_head = model.lm_head

    def layer(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder layer ``index`` on ``[S, D]``: positions ``0..S-1``, causal."""
        x = hidden[None]
        positions = torch.arange(hidden.shape[0], device=hidden.device)[None]
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=x,
            attention_mask=None,
            past_key_values=None,
            position_ids=positions,
        )
        rope = self.rotary(x, positions)
        out = self.layers[index](
            x, attention_mask=mask, position_ids=positions, position_embeddings=rope
        )
        return out[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))


def _saliency(stack: _Stack, layer: int, hidden: torch.Tensor, params: TrioParams) -> torch.Tensor:
    """``||dLoss/dH||`` per row, the proxy loss computed by HF's layer over all rows."""
    positions = loss_position_mask(
        hidden.shape[0], params.num_loss_positions, params.include_final_position
    ).to(hidden.device)
    # Callers may hold inference tensors (e.g. a serving loop): clone a fresh leaf.
    with torch.inference_mode(False), torch.enable_grad():
        leaf = hidden.detach().clone().requires_grad_(True)
        logits = stack.logits(stack.layer(layer, leaf)).float()
        pseudo = logits.detach().argmax(dim=-1)
        labels = torch.where(positions, pseudo, torch.full_like(pseudo, _IGNORE))
        loss = F.cross_entropy(logits, labels, ignore_index=_IGNORE)
        (grad,) = torch.autograd.grad(loss, leaf)
    return grad.float().norm(dim=-1)


def _prefill(
    model: LlavaNextForConditionalGeneration,
    embeds: torch.Tensor,
    visual_rows: torch.Tensor,
    schedule: Schedule,
    params: TrioParams,
    fixed: Sequence[torch.Tensor] | None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor | None]]:
    """Pruned forward over ``embeds`` ``[S, D]``; ``fixed`` replays a selection.

    Returns the last position's logits and, per stage, the kept indices and
    saliency (None when nothing was scored).
    """
    stack = _Stack(model)
    num_layers = len(stack.layers)
    stages = schedule.stages
    if stages[-1].layer >= num_layers:
        raise ValueError(
            f"stage layer {stages[-1].layer} is out of range: "
            f"the model has {num_layers} decoder layers"
        )
    by_layer = {st.layer: i for i, st in enumerate(stages)}
    kept_all: list[torch.Tensor] = []
    saliency_all: list[torch.Tensor | None] = []
    hidden, vis = embeds, visual_rows
    for index in range(num_layers):
        stage_no = by_layer.get(index)
        if stage_no is not None:
            n, k = vis.numel(), stages[stage_no].keep
            scores: torch.Tensor | None = None
            if fixed is not None:
                kept = fixed[stage_no].to(vis.device)
            elif k >= n:  # nothing to drop: the reference skips scoring too
                kept = torch.arange(n, device=vis.device)
            else:
                scores = _saliency(stack, index, hidden, params)[vis]
                kept = nms_select(hidden.detach()[vis], scores, k, params.tau)
            kept_all.append(kept)
            saliency_all.append(scores)
            row_kept = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
            row_kept[vis] = False
            row_kept[vis[kept]] = True
            new_row = torch.cumsum(row_kept.long(), 0) - 1  # contiguous renumbering
            hidden, vis = hidden[row_kept], new_row[vis[kept]]
        hidden = stack.layer(index, hidden)
    logits = stack.logits(hidden[-1:])[0]
    return logits, kept_all, saliency_all


def prune_forward_hf(
    model: LlavaNextForConditionalGeneration,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    image_sizes: torch.Tensor,
    schedule: Schedule,
    params: TrioParams = _DEFAULT_PARAMS,
) -> ReferenceResult:
    """One prompt's prefill with TRIO pruning inside the LLM, as the paper's code.

    Args:
        model: an HF LLaVA-NeXT (Llama language model), in eval mode.
        input_ids: ``[S]`` prompt ids with image placeholders already expanded.
        pixel_values, image_sizes: as returned by ``LlavaNextImageProcessor``.
        schedule: pruning stages; ``stage.layer`` counts decoder layers
            (0: prune the input embeddings), ``stage.keep`` is the number of
            visual tokens that enter that layer.
    """
    with torch.no_grad():
        embeds = build_inputs_embeds(model, input_ids, pixel_values, image_sizes)
        visual = torch.nonzero(input_ids == model.config.image_token_id).squeeze(1)
        logits, kept, saliency = _prefill(model, embeds, visual, schedule, params, None)
    return ReferenceResult(
        logits_last=logits,
        kept_positions=kept,
        visual_positions=visual,
        saliency=saliency,
    )


def generate_hf(
    model: LlavaNextForConditionalGeneration,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    image_sizes: torch.Tensor,
    schedule: Schedule,
    params: TrioParams = _DEFAULT_PARAMS,
    max_new_tokens: int = 16,
    eos_token_id: int | None = None,
) -> list[int]:
    """Greedy decoding with the selection made once, at prefill.

    Each step recomputes the whole pruned forward (no KV cache; meant for tiny
    models) and replays the prefill's selection, so generated tokens never
    change which visual tokens are kept. That equals the reference's cached
    decoding: there, layers below a stage cache every token and layers above
    it cache only the survivors, with positions shifted by the dropped count,
    which is what contiguous renumbering gives the new tokens here.
    Stops after ``eos_token_id`` (included) or ``max_new_tokens`` tokens.
    """
    if max_new_tokens < 1:
        return []
    with torch.no_grad():
        prompt = build_inputs_embeds(model, input_ids, pixel_values, image_sizes)
        visual = torch.nonzero(input_ids == model.config.image_token_id).squeeze(1)
        logits, kept, _ = _prefill(model, prompt, visual, schedule, params, None)
        tokens = [int(logits.argmax())]
        embed = model.get_input_embeddings()
        while len(tokens) < max_new_tokens and tokens[-1] != eos_token_id:
            new = embed(torch.tensor(tokens, device=input_ids.device))
            hidden = torch.cat([prompt, new.to(prompt.dtype)], dim=0)
            logits, _, _ = _prefill(model, hidden, visual, schedule, params, kept)
            tokens.append(int(logits.argmax()))
    return tokens
