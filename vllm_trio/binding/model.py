"""vLLM model class: LLaVA-NeXT whose image embeddings are pruned by TRIO.

``embed_multimodal`` encodes all N tokens of an image, rebuilds the prompt the
processor saw (text + this image's N embeddings), runs the side pass at depth
L with the language model's own weights, and returns the k kept embeddings in
their original order: exactly the k placeholders the processor reserved.

Under tensor parallelism every rank runs the same side pass on its weight
shards (``LlamaSidePass`` with vLLM's tensor-parallel collectives) and keeps
the selection of TP rank 0, so the ranks can never disagree on which
embeddings make up the prompt.

Other images of the same prompt are left out of an image's side-pass context
(each item is scored on its own), because vLLM may encode the items of one
request in different steps and the selection must not depend on scheduling.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from vllm.config import VllmConfig
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    get_tp_group,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..config import TrioConfig
from ..core import TensorParallel, TrioParams
from .layer_mode import TEXT_ROWS_FIELD, LayerHandover
from .processor import (
    TRIO_FIELDS,
    TrioLlavaNextMultiModalProcessor,
    TrioLlavaNextProcessingInfo,
)
from .side_pass import LlamaSidePass


@MULTIMODAL_REGISTRY.register_processor(
    TrioLlavaNextMultiModalProcessor,
    info=TrioLlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class TrioLlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
    """LLaVA-NeXT with TRIO visual-token pruning at the input."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._tp = _vllm_tensor_parallel()
        self.trio_config = TrioConfig.from_hf_config(self.config)
        self.trio_params = TrioParams(
            tau=self.trio_config.tau,
            num_loss_positions=self.trio_config.num_loss_positions,
            include_final_position=self.trio_config.include_final_position,
        )
        self._side_pass = LlamaSidePass(
            self.language_model,
            self.trio_config.depth,
            self.config.text_config.vocab_size,
            self._tp,
        )
        #: Layer mode: hands the side pass's layer-L states to decoder layer L.
        self._handover = _layer_handover(self, vllm_config)
        #: Recent selections, newest last; read by tests and debugging tools
        #: through ``LLM.apply_model``. Bounded, so it never grows.
        self.trio_selection_log: deque[SelectionRecord] = deque(maxlen=256)

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        trio = {name: kwargs.pop(name, None) for name in TRIO_FIELDS}
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        features = self._process_image_input(image_input)
        if trio["trio_num_keep"] is None:
            return features
        pruned = []
        for i, feats in enumerate(features):
            k = int(_item(trio["trio_num_keep"], i))
            if k >= feats.shape[0]:
                pruned.append(feats)
                continue
            prompt_ids = _item(trio["trio_prompt_ids"], i)
            ordinal = int(_item(trio["trio_ordinal"], i))
            start = time.perf_counter()
            keep, context = self._select(feats, prompt_ids, ordinal, k)
            self.trio_selection_log.append(
                SelectionRecord(
                    prompt_ids=tuple(prompt_ids.tolist()),
                    ordinal=ordinal,
                    num_tokens=feats.shape[0],
                    keep=keep.tolist(),
                    side_pass_s=time.perf_counter() - start,
                )
            )
            if self._handover is None:
                pruned.append(feats.index_select(0, keep))
            else:
                text_rows = int(_item(trio[TEXT_ROWS_FIELD], i))
                pruned.append(self._handover.item_rows(*context, keep, text_rows))
        return pruned

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        if (
            self._handover is not None
            and multimodal_embeddings is not None
            and (is_multimodal is not None)
        ):
            # Every step of a multimodal model passes here, also without items.
            multimodal_embeddings = self._handover.stage(multimodal_embeddings, is_multimodal)
        return super().embed_input_ids(
            input_ids, multimodal_embeddings, is_multimodal=is_multimodal
        )

    def _select(
        self, feats: torch.Tensor, prompt_ids: torch.Tensor, ordinal: int, k: int
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Kept indices of one image's ``feats`` ``[N, D]``, scored in its prompt, and
        the side-pass context: embeddings and states entering layer L, visual rows."""
        embeds, visual_index = self._side_pass_context(feats, prompt_ids, ordinal)
        hidden = self._side_pass.hidden_at_depth(embeds)
        keep = self._side_pass.select(embeds, visual_index, k, self.trio_params, hidden).keep
        if self._tp is not None:
            # Ranks agree up to summation order; rank 0 decides near-ties.
            keep = get_tp_group().broadcast(keep, src=0)
        return keep, (embeds, hidden, visual_index)

    def _side_pass_context(
        self, feats: torch.Tensor, prompt_ids: torch.Tensor, ordinal: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings with this image's N rows in place of its ``<image>``."""
        ids = prompt_ids.to(feats.device)
        is_image = ids == self.config.image_token_index
        image_pos = torch.nonzero(is_image).squeeze(1)
        if ordinal >= image_pos.numel():
            raise ValueError(
                f"vllm-trio: image #{ordinal} has no <image> placeholder in its prompt"
            )
        pos = int(image_pos[ordinal])
        before = ids[:pos][~is_image[:pos]]
        after = ids[pos + 1 :][~is_image[pos + 1 :]]
        text = self.language_model.embed_input_ids(torch.cat([before, after]))
        embeds = torch.cat([text[: before.numel()], feats.to(text.dtype), text[before.numel() :]])
        visual_index = torch.arange(
            before.numel(), before.numel() + feats.shape[0], device=feats.device
        )
        return embeds, visual_index


@dataclass(frozen=True)
class SelectionRecord:
    """One image's selection: its prompt, which ``<image>`` it is, N, kept indices,
    and the wall time of its side pass (context build, layers 0..L, NMS)."""

    prompt_ids: tuple[int, ...]
    ordinal: int
    num_tokens: int
    keep: list[int]
    side_pass_s: float


def selection_log(model: TrioLlavaNextForConditionalGeneration) -> list[SelectionRecord]:
    """``LLM.apply_model(selection_log)``: every worker's recent selections.

    A module-level function, because with tensor parallelism ``apply_model``
    pickles it to each worker process (a lambda cannot travel).
    """
    return list(model.trio_selection_log)


def _layer_handover(
    model: TrioLlavaNextForConditionalGeneration, vllm_config: VllmConfig
) -> LayerHandover | None:
    """The layer-mode handover of ``model``, or None in input mode (and at depth 0,
    where the states entering layer L are the embeddings: layer mode is input mode)."""
    cfg = model.trio_config
    if cfg.mode != "layer" or cfg.depth == 0:
        return None
    broadcast = None
    if model._tp is not None:
        broadcast = lambda t: get_tp_group().broadcast(t, src=0)  # noqa: E731
    return LayerHandover(
        model.language_model,
        cfg.depth,
        vllm_config.scheduler_config.max_num_batched_tokens,
        vllm_config.model_config.dtype,
        broadcast,
    )


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


def _item(batch: object, i: int) -> torch.Tensor:
    """Element ``i`` of a batched field (a stacked tensor or a list of tensors)."""
    if isinstance(batch, torch.Tensor | Sequence):
        return batch[i]
    raise TypeError(f"unexpected batched field type {type(batch).__name__}")
