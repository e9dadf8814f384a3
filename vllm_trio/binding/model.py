"""vLLM model class: LLaVA-NeXT whose image embeddings are pruned by TRIO.

``embed_multimodal`` encodes all N tokens of each image and keeps the k rows
that ``trio_model.TrioModelMixin`` selects (the side pass over the prompt the
processor saw, with positions ``0..S-1``), in their original order: exactly
the k placeholders the processor reserved.
"""

from __future__ import annotations

from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration
from vllm.multimodal import MULTIMODAL_REGISTRY

from .processor import TrioLlavaNextMultiModalProcessor, TrioLlavaNextProcessingInfo
from .trio_model import SelectionRecord, TrioModelMixin, selection_log

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

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        trio = self.pop_trio_fields(kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        features = self._process_image_input(image_input)
        if trio["trio_num_keep"] is None:
            return features
        return [
            feats if keep is None else feats.index_select(0, keep)
            for feats, keep in zip(features, self.trio_keep(features, trio), strict=True)
        ]
