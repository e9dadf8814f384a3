"""Layer mode (``--trio-mode layer``): the paper's in-LLM pruning at layer L, with k tokens of KV.

In input mode the k kept embeddings enter layer 0 of a shortened prompt, so
they never see the dropped tokens. The paper lets layers 0..L-1 see all N.
The side pass already runs layers 0..L-1 over the full prompt (text + this
image's N tokens), so its hidden states entering layer L are the paper's.
Layer mode keeps the prompt exactly as short as input mode (k placeholders
per image, k tokens of KV in every layer) and hands those states over: the
residual stream entering decoder layer L of vLLM's own prefill is replaced, at
the kept visual tokens, by the side pass's states. Layers L.. then compute what
the paper's layers L.. compute.

Text after the image. Its rows entering layer L differ too (in the paper they
saw all N tokens below L). For a prompt with exactly one image, the text after
it is handed over as well, which makes the whole prompt's layer-L input, hence
every layer from L on and the first generated token, equal the paper's. This
is sound under chunked prefill and prefix caching because the text rows become
part of the image's placeholder range (``handover_update``): vLLM slices an
item's encoder output by rows when its range spans chunks, and keys the KV
blocks over the range on the item hash (which covers the prompt). With several
images, each is scored without the others (``model.py``), so no text after any
of them is handed over, only the visual rows. What stays different from the
paper in every case: decoded tokens read, in layers below L, the KV of the k
kept tokens instead of all N (DESIGN.md section 6).

How the rows travel (vLLM 0.32): ``embed_multimodal`` returns, per pruned
item, rows ``[k (+ T), 2 D]`` = [the embedding entering layer 0 | the state
entering layer L]. The runner caches them, slices them by rows when a chunk
ends inside the placeholder range, and passes the slices of one step to
``embed_input_ids`` together with the placeholder mask. :meth:`LayerHandover.stage`
splits them: the first halves are scattered as usual, the second halves are
written into a persistent buffer (preallocated at ``max_num_batched_tokens``
rows) at their token positions, with a persistent row mask. Layer L's forward
(:class:`_HandoverLayerMixin`) applies ``torch.where`` over those buffers.

Why this is safe compiled (``torch.compile``, CUDA graphs): the buffers are
registered buffers of layer L, so the traced graph reads them as inputs (same
storage every step, updated in place outside the graph); nothing per step is a
Python value in the graph; a step without handed-over rows runs the same two
element-wise selects over an all-false mask, which is its only cost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

#: Per-item field: how many text tokens after the image its placeholder range
#: (and its rows) cover; 0 in input mode and whenever text is not handed over.
TEXT_ROWS_FIELD = "trio_text_rows"


def num_text_rows(
    prompt: Sequence[int],
    image_token_id: int,
    num_tokens: int,
    num_keep: int,
    mode: str,
    depth: int,
) -> int:
    """Text rows after the image handed over with it (processor side).

    All of the text after the image when layer mode prunes the only image of the
    prompt (one ``<image>`` in it), else 0. Capped so an item never has more
    rows than its unpruned image (``num_keep + T <= num_tokens``): vLLM sized its
    encoder budget and cache for unpruned items, and an item larger than the
    budget would never be scheduled. Beyond the cap only visual rows travel.
    """
    if mode != "layer" or depth == 0 or num_keep >= num_tokens:
        return 0
    positions = [i for i, t in enumerate(prompt) if t == image_token_id]
    if len(positions) != 1:
        return 0
    after = len(prompt) - positions[0] - 1
    return after if num_keep + after <= num_tokens else 0


def handover_update(
    image_token_id: int, prompt: torch.Tensor, num_keep: int, text_rows: int
) -> tuple[list[int], list[int]]:
    """Prompt update ``(target, replacement)`` of one pruned image (processor side).

    With ``text_rows`` the target is ``<image>`` plus the text after it and the
    replacement is k placeholders plus that same text, so the text tokens stay
    where they were but fall inside the item's placeholder range.
    """
    suffix = [int(t) for t in prompt[len(prompt) - text_rows :]] if text_rows else []
    return [image_token_id, *suffix], [image_token_id] * num_keep + suffix


class LayerHandover:
    """Model side: builds an item's rows, stages a step's rows, owns layer L's buffers."""

    def __init__(
        self,
        language_model: nn.Module,
        depth: int,
        max_num_tokens: int,
        dtype: torch.dtype,
        broadcast: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if depth < 1:
            raise ValueError("layer mode needs trio_depth >= 1 (at depth 0 it is input mode)")
        layer = language_model.model.layers[depth]
        width = int(language_model.model.embed_tokens.embedding_dim)
        device = next(layer.parameters()).device
        layer.register_buffer(
            "trio_handover_rows",
            torch.zeros(max_num_tokens, width, dtype=dtype, device=device),
            persistent=False,
        )
        layer.register_buffer(
            "trio_handover_mask",
            torch.zeros(max_num_tokens, dtype=torch.bool, device=device),
            persistent=False,
        )
        layer.__class__ = _handover_class(type(layer))
        self._rows: torch.Tensor = layer.trio_handover_rows
        self._mask: torch.Tensor = layer.trio_handover_mask
        self._width = width
        self._broadcast = broadcast
        self._staged: torch.Tensor | None = None

    def item_rows(
        self,
        embeds: torch.Tensor,
        hidden: torch.Tensor,
        visual_index: torch.Tensor,
        keep: torch.Tensor,
        text_rows: int,
    ) -> torch.Tensor:
        """``[k + text_rows, 2 D]`` rows of one item from its side-pass context.

        ``embeds``/``hidden``: the side-pass prompt entering layer 0 / layer L;
        ``visual_index``: this image's rows in it; ``keep``: the kept visual
        indices; ``text_rows``: how many rows after the image to hand over.
        """
        rows = visual_index.index_select(0, keep)
        if text_rows:
            start = int(visual_index[-1]) + 1
            text = torch.arange(start, start + text_rows, device=rows.device)
            rows = torch.cat([rows, text])
        state = hidden.index_select(0, rows).to(embeds.dtype)
        if self._broadcast is not None:
            # Ranks agree up to summation order; rank 0's states are the ones used.
            state = self._broadcast(state)
        return torch.cat([embeds.index_select(0, rows), state], dim=1)

    def stage(
        self, multimodal_embeddings: Sequence[torch.Tensor], is_multimodal: torch.Tensor
    ) -> list[torch.Tensor]:
        """Write this step's layer-L rows into layer L's buffers; return the layer-0 halves.

        Called by ``embed_input_ids`` once per step, before the forward it
        feeds. ``multimodal_embeddings`` are the row slices of this step in
        placeholder order (those of unpruned items are ``D`` wide and carry
        nothing to hand over); ``is_multimodal`` marks their token positions.
        """
        if self._staged is not None:
            self._mask.index_fill_(0, self._staged, False)
            self._staged = None
        wide = 2 * self._width
        if not any(e.shape[-1] == wide for e in multimodal_embeddings):
            return list(multimodal_embeddings)
        first, state, flags = [], [], []
        for e in multimodal_embeddings:
            handed = e.shape[-1] == wide
            first.append(e[:, : self._width] if handed else e)
            if handed:
                state.append(e[:, self._width :])
            flags.append(torch.full((e.shape[0],), handed, dtype=torch.bool))
        positions = torch.nonzero(is_multimodal.cpu()).squeeze(1)[torch.cat(flags)]
        index = positions.to(self._mask.device, non_blocking=True)
        self._rows.index_copy_(0, index, torch.cat(state).to(self._rows.dtype))
        self._mask.index_fill_(0, index, True)
        self._staged = index
        return first


class _HandoverLayerMixin(nn.Module):
    """Decoder layer L that takes the handed-over rows as its input residual stream.

    vLLM's Llama layer receives ``(hidden_states, residual)`` and its fused
    add-norm forms ``hidden_states + residual`` as the value entering the layer.
    At masked rows the pair becomes ``(state, 0)``, whose sum is ``state``
    exactly in any dtype; other rows pass through unchanged, bit for bit.
    """

    trio_handover_rows: torch.Tensor
    trio_handover_mask: torch.Tensor

    def forward(self, positions, hidden_states, residual, *args, **kwargs):  # type: ignore[override]
        n = hidden_states.shape[0]
        mask = self.trio_handover_mask[:n].unsqueeze(-1)
        hidden_states = torch.where(mask, self.trio_handover_rows[:n], hidden_states)
        residual = residual.masked_fill(mask, 0)
        return super().forward(positions, hidden_states, residual, *args, **kwargs)


_HANDOVER_CLASSES: dict[type, type] = {}


def _handover_class(base: type) -> type:
    """``base`` (vLLM's decoder layer class) with the handover in front of its forward.

    The instance's class is swapped rather than the layer wrapped, so parameter
    names, weight loading and vLLM's layer bookkeeping stay as they are.
    """
    cls = _HANDOVER_CLASSES.get(base)
    if cls is None:
        cls = type(f"TrioHandover{base.__name__}", (_HandoverLayerMixin, base), {})
        _HANDOVER_CLASSES[base] = cls
    return cls
