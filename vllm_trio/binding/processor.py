"""LLaVA-NeXT's multimodal processor with TRIO: each image gets k = f(N, r) placeholders.

The family-independent hooks (TRIO kwargs, salted hashes, no pruning while
profiling, the scoring-context 400, the cache-drift fix) are
``trio_processor.TrioProcessorMixin``; this module adds what is LLaVA-NeXT's:
the ``<image>`` token, N from each image's size (anyres tiles, newlines), and
the prompt update that writes k ``<image>`` tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from transformers import BatchFeature
from vllm.model_executor.models.llava_next import (
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal.inputs import MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from .layer_mode import TEXT_ROWS_FIELD, handover_update
from .trio_processor import TRIO_FIELDS, TrioProcessingInfoMixin, TrioProcessorMixin

__all__ = ["TRIO_FIELDS", "TrioLlavaNextMultiModalProcessor", "TrioLlavaNextProcessingInfo"]


class TrioLlavaNextProcessingInfo(TrioProcessingInfoMixin, LlavaNextProcessingInfo):
    pass


class TrioLlavaNextMultiModalProcessor(
    TrioProcessorMixin, LlavaNextMultiModalProcessor[TrioLlavaNextProcessingInfo]
):
    """LLaVA-NeXT processor that sizes each image's placeholders to k."""

    def _trio_image_token_id(self) -> int:
        return self.info.get_hf_config().image_token_index

    def _trio_num_image_tokens(self, out: BatchFeature) -> list[int] | None:
        if "image_sizes" not in out:
            return None
        return [
            self.info.get_num_image_tokens(image_width=int(w), image_height=int(h))
            for h, w in out["image_sizes"].tolist()
        ]

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        image_token_id = self.info.get_hf_config().image_token_index
        stock = updates[0]

        def update(item_idx: int) -> tuple[list[int], list[int]] | None:
            """(target, replacement) of a TRIO item: k placeholders, and in layer
            mode the handed-over text after the image inside the same range."""
            item = out_mm_kwargs["image"][item_idx]
            if "trio_num_keep" not in item:
                return None
            return handover_update(
                image_token_id,
                item["trio_prompt_ids"].data,
                int(item["trio_num_keep"].data),
                int(item[TEXT_ROWS_FIELD].data),
            )

        def target(item_idx: int) -> list[int]:
            trio = update(item_idx)
            return [image_token_id] if trio is None else trio[0]

        def replacement(item_idx: int) -> list[int]:
            trio = update(item_idx)
            return stock.replacement(item_idx) if trio is None else trio[1]  # type: ignore[operator]

        return [PromptReplacement(modality="image", target=target, replacement=replacement)]
