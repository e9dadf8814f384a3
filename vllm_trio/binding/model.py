"""vLLM model class: LLaVA-NeXT whose image embeddings are pruned by TRIO.

``embed_multimodal`` encodes all N tokens of each image and keeps the k rows
that ``trio_model.TrioModelMixin`` selects (the side pass over the prompt the
processor saw, with positions ``0..S-1``), in their original order: exactly
the k placeholders the processor reserved.
"""

from __future__ import annotations

from vllm.config import VllmConfig
from vllm.distributed import get_tp_group
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration
from vllm.multimodal import MULTIMODAL_REGISTRY

from .layer_mode import TEXT_ROWS_FIELD, LayerHandover
from .processor import TrioLlavaNextMultiModalProcessor, TrioLlavaNextProcessingInfo
from .trio_model import SelectionRecord, TrioModelMixin, batch_item, selection_log

__all__ = ["SelectionRecord", "TrioLlavaNextForConditionalGeneration", "selection_log"]


@MULTIMODAL_REGISTRY.register_processor(
    TrioLlavaNextMultiModalProcessor,
    info=TrioLlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class TrioLlavaNextForConditionalGeneration(TrioModelMixin, LlavaNextForConditionalGeneration):
    """LLaVA-NeXT with TRIO visual-token pruning at the input."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.init_trio(
            self.language_model,
            self.config.text_config.vocab_size,
            self.config.image_token_index,
        )
        #: Layer mode: hands the side pass's layer-L states to decoder layer L.
        self._handover = _layer_handover(self, vllm_config)

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        trio = self.pop_trio_fields(kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        features = self._process_image_input(image_input)
        if trio["trio_num_keep"] is None:
            return features
        if self._handover is None:
            return [
                feats if keep is None else feats.index_select(0, keep)
                for feats, keep in zip(features, self.trio_keep(features, trio), strict=True)
            ]
        rows = []
        for i, (feats, result) in enumerate(
            zip(features, self.trio_select(features, trio), strict=True)
        ):
            if result is None:
                rows.append(feats)
                continue
            text_rows = int(batch_item(trio[TEXT_ROWS_FIELD], i))
            rows.append(
                self._handover.item_rows(
                    result.embeds, result.hidden, result.visual_index, result.keep, text_rows
                )
            )
        return rows

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
