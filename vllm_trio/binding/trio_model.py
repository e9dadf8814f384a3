"""The family-independent half of TRIO's vLLM model class (one mixin).

For each image item that carries TRIO fields, :meth:`TrioModelMixin.trio_keep`
rebuilds the prompt the processor saw (text + this image's N embeddings),
runs the side pass at depth L with the language model's own weights, and
returns the k kept indices in their original order: exactly the k
placeholders the processor reserved. Each family's model (``model`` for
LLaVA-NeXT, ``qwen2_5_vl``) calls it from its ``embed_multimodal`` and adds
what differs: how it encodes images, the positions of the side-pass context,
and what it returns with the kept rows.

Under tensor parallelism every rank runs the same side pass on its weight
shards (``LlamaSidePass`` with vLLM's tensor-parallel collectives) and keeps
the selection of TP rank 0, so the ranks can never disagree on which
embeddings make up the prompt.

Other images of the same prompt are left out of an image's side-pass context
(each item is scored on its own), because vLLM may encode the items of one
request in different steps and the selection must not depend on scheduling.

The images of one ``embed_multimodal`` call (vLLM batches every image it
encodes in a step, across requests) are scored in one batched side pass,
right-padded (``core.batch``), so the fixed costs of a side pass are paid
once per batch. Each image's selection is its solo one up to summation order
(``tests/test_core_batch.py``, ``tests/test_engine.py``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    get_tp_group,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)

from .. import metrics
from ..config import TrioConfig
from ..core import MAX_BATCH_ROWS, TensorParallel, TrioParams, plan_batches
from .side_pass import LlamaSidePass
from .trio_processor import TRIO_FIELDS

#: ``(item, rows before the image, rows after it) -> positions`` of an item's
#: side-pass context, or None for ``0..S-1``.
ContextPositions = Callable[[int, int, int], torch.Tensor | None]


@dataclass(frozen=True)
class SelectionRecord:
    """One image's selection: its prompt, which image it is, N, kept indices,
    the wall time of its side pass (its context build plus its share of the
    batched layers 0..L, gradient and NMS: the batch's time over its images),
    and how many images that batched pass scored."""

    prompt_ids: tuple[int, ...]
    ordinal: int
    num_tokens: int
    keep: list[int]
    side_pass_s: float
    batch_size: int = 1


@dataclass(frozen=True)
class SidePassResult:
    """One image's side pass: the kept indices, the prompt embeddings it scored
    (text + all N visual rows), the states entering layer L, and the visual rows."""

    keep: torch.Tensor
    embeds: torch.Tensor
    hidden: torch.Tensor
    visual_index: torch.Tensor


@dataclass
class _Pending:
    """One image waiting for its side pass: its context, and the seconds spent on it."""

    index: int
    k: int
    prompt_ids: torch.Tensor
    ordinal: int
    embeds: torch.Tensor
    visual_index: torch.Tensor
    positions: torch.Tensor | None
    seconds: float
    batch_size: int = 1


class TrioModelMixin:
    """Scores and selects each image's visual tokens; families call :meth:`trio_keep`."""

    config: object  # the model's HF config, with the trio_* fields
    trio_image_token_id: int
    #: Cap on ``B * S_max`` padded rows of one batched side pass (bounds its
    #: activation memory); a longer single prompt runs alone.
    trio_max_batch_rows: int = MAX_BATCH_ROWS

    def init_trio(
        self,
        language_model: nn.Module,
        vocab_size: int,
        image_token_id: int,
        side_pass_cls: type[LlamaSidePass] = LlamaSidePass,
    ) -> None:
        """Call at the end of ``__init__`` (needs ``self.config`` with the trio_* fields)."""
        from vllm.config import get_current_vllm_config

        self._tp = _vllm_tensor_parallel()
        self._model_name = get_current_vllm_config().model_config.served_model_name
        self.trio_config = TrioConfig.from_hf_config(self.config)
        self.trio_params = TrioParams(
            tau=self.trio_config.tau,
            num_loss_positions=self.trio_config.num_loss_positions,
            include_final_position=self.trio_config.include_final_position,
        )
        self.trio_image_token_id = image_token_id
        self._trio_embed = language_model.embed_input_ids
        self._side_pass = side_pass_cls(
            language_model, self.trio_config.depth, vocab_size, self._tp
        )
        #: Recent selections, newest last; read by tests and debugging tools
        #: through ``LLM.apply_model``. Bounded, so it never grows.
        self.trio_selection_log: deque[SelectionRecord] = deque(maxlen=256)

    @staticmethod
    def pop_trio_fields(kwargs: dict[str, object]) -> dict[str, object]:
        """Take TRIO's per-item fields out of ``embed_multimodal``'s kwargs."""
        return {name: kwargs.pop(name, None) for name in TRIO_FIELDS}

    def trio_keep(
        self,
        features: Sequence[torch.Tensor],
        trio: Mapping[str, object],
        context_positions: ContextPositions | None = None,
    ) -> list[torch.Tensor | None]:
        """Kept row indices of each image's ``features`` ``[N, D]`` (None: keep all)."""
        return [
            None if result is None else result.keep
            for result in self.trio_select(features, trio, context_positions)
        ]

    def trio_select(
        self,
        features: Sequence[torch.Tensor],
        trio: Mapping[str, object],
        context_positions: ContextPositions | None = None,
    ) -> list[SidePassResult | None]:
        """Each image's side pass: kept indices and its context (None: keep all).

        The images that need one (k < N) are scored together, in batches of
        at most ``trio_max_batch_rows`` padded rows (``core.plan_batches``); a
        batch of one runs the single-prompt path.
        """
        if trio["trio_num_keep"] is None:
            return [None] * len(features)
        pending: list[_Pending] = []
        for i, feats in enumerate(features):
            k = int(batch_item(trio["trio_num_keep"], i))
            if k >= feats.shape[0]:
                continue
            start = time.perf_counter()
            prompt_ids = batch_item(trio["trio_prompt_ids"], i)
            ordinal = int(batch_item(trio["trio_ordinal"], i))
            embeds, visual_index = self._side_pass_context(feats, prompt_ids, ordinal)
            positions = None
            if context_positions is not None:
                before = int(visual_index[0])
                after = embeds.shape[0] - before - feats.shape[0]
                positions = context_positions(i, before, after)
            seconds = time.perf_counter() - start
            pending.append(
                _Pending(i, k, prompt_ids, ordinal, embeds, visual_index, positions, seconds)
            )
        done: dict[int, SidePassResult] = {}
        lengths = [p.embeds.shape[0] for p in pending]
        for batch in plan_batches(lengths, self.trio_max_batch_rows):
            items = [pending[j] for j in batch]
            start = time.perf_counter()
            batch_results = self._select(items)
            share = (time.perf_counter() - start) / len(items)
            for item, result in zip(items, batch_results, strict=True):
                done[item.index] = result
                item.seconds += share
                item.batch_size = len(items)
        for item in pending:  # metrics and log per image, in item order
            result = done[item.index]
            if self._tp is None or self._tp.rank == 0:  # once per image, not per rank
                metrics.observe("vllm:trio_side_pass_seconds", item.seconds, (self._model_name,))
            self.trio_selection_log.append(
                SelectionRecord(
                    prompt_ids=tuple(item.prompt_ids.tolist()),
                    ordinal=item.ordinal,
                    num_tokens=item.visual_index.numel(),
                    keep=result.keep.tolist(),
                    side_pass_s=item.seconds,
                    batch_size=item.batch_size,
                )
            )
        return [done.get(i) for i in range(len(features))]

    def _select(self, items: Sequence[_Pending]) -> list[SidePassResult]:
        """Kept indices of a batch of images, each scored in its own prompt."""
        if len(items) == 1:
            [item] = items
            hidden = self._side_pass.hidden_at_depth(item.embeds, item.positions)
            keeps = [
                self._side_pass.select(
                    item.embeds, item.visual_index, item.k, self.trio_params, item.positions, hidden
                ).keep
            ]
            hiddens = [hidden]
        else:
            selections, hiddens = self._side_pass.select_batch(
                [p.embeds for p in items],
                [p.visual_index for p in items],
                [p.k for p in items],
                self.trio_params,
                [p.positions for p in items],
            )
            keeps = [s.keep for s in selections]
        if self._tp is not None:
            # Ranks agree up to summation order; rank 0 decides near-ties.
            sizes = [k.numel() for k in keeps]
            keeps = list(get_tp_group().broadcast(torch.cat(keeps), src=0).split(sizes))
        return [
            SidePassResult(keep, p.embeds, hidden, p.visual_index)
            for p, keep, hidden in zip(items, keeps, hiddens, strict=True)
        ]

    def _side_pass_context(
        self, feats: torch.Tensor, prompt_ids: torch.Tensor, ordinal: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings with this image's N rows in place of its placeholder."""
        ids = prompt_ids.to(feats.device)
        is_image = ids == self.trio_image_token_id
        image_pos = torch.nonzero(is_image).squeeze(1)
        if ordinal >= image_pos.numel():
            raise ValueError(f"vllm-trio: image #{ordinal} has no placeholder in its prompt")
        pos = int(image_pos[ordinal])
        before = ids[:pos][~is_image[:pos]]
        after = ids[pos + 1 :][~is_image[pos + 1 :]]
        text = self._trio_embed(torch.cat([before, after]))
        embeds = torch.cat([text[: before.numel()], feats.to(text.dtype), text[before.numel() :]])
        visual_index = torch.arange(
            before.numel(), before.numel() + feats.shape[0], device=feats.device
        )
        return embeds, visual_index


def selection_log(model: TrioModelMixin) -> list[SelectionRecord]:
    """``LLM.apply_model(selection_log)``: every worker's recent selections.

    A module-level function, because with tensor parallelism ``apply_model``
    pickles it to each worker process (a lambda cannot travel).
    """
    return list(model.trio_selection_log)


def _vllm_tensor_parallel() -> TensorParallel | None:
    """This worker's tensor-parallel group, or None without tensor parallelism."""
    world = get_tensor_model_parallel_world_size()
    if world == 1:
        return None
    return TensorParallel(
        world_size=world,
        rank=get_tensor_model_parallel_rank(),
        all_reduce=tensor_model_parallel_all_reduce,
        all_gather=lambda x: tensor_model_parallel_all_gather(x, dim=-1),
    )


def batch_item(batch: object, i: int) -> torch.Tensor:
    """Element ``i`` of a batched field (a stacked tensor or a list of tensors)."""
    if isinstance(batch, torch.Tensor | Sequence):
        return batch[i]
    raise TypeError(f"unexpected batched field type {type(batch).__name__}")
