"""Multimodal processor: gives each image k = f(N, r) placeholder tokens.

The prompt itself gets shorter, so vLLM's scheduler allocates KV blocks for
the pruned prompt in every layer (the shape of vLLM's EVS video pruning).
Each image item also carries what the model's side pass needs: the prompt's
token ids, which ``<image>`` it is, k and the depth.

Cache safety: vLLM keys its processor cache, encoder cache and prefix-cache
block hashes on the item hash, which covers the image and the processor
kwargs but not the text. We put the prompt ids, ratio and depth into the
kwargs (and salt by the item's ordinal), so one image under two questions or
two ratios never shares a selection. At r = 1 nothing depends on the text and
the prompt is left out of the hash, keeping cache reuse as stock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from transformers import BatchFeature
from vllm.model_executor.models.llava_next import (
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate
from vllm.multimodal.processing.inputs import ProcessorInputs

from ..config import TrioConfig
from ..core.budget import num_kept_tokens, validate_keep_ratio
from ..requests.keep_ratio import KEEP_RATIO_KWARG
from .layer_mode import TEXT_ROWS_FIELD, handover_update, num_text_rows

#: Request-level processor kwargs understood by TRIO. ``trio_keep_ratio`` is
#: public (offline: ``mm_processor_kwargs={"trio_keep_ratio": r}``); the
#: others are filled in by the processor itself.
_PROMPT_KWARG = "trio_prompt"
_DEPTH_KWARG = "trio_depth"
_MODE_KWARG = "trio_mode"
_ORDINALS_KWARG = "trio_item_ordinals"
_TRIO_KWARGS = frozenset(
    {KEEP_RATIO_KWARG, _PROMPT_KWARG, _DEPTH_KWARG, _MODE_KWARG, _ORDINALS_KWARG}
)

#: Per-image fields handed to the model with the pixels (the depth is
#: server-wide and read from the config; it is in the kwargs for the hash, as is
#: the mode, so input- and layer-mode items never share a cache entry).
TRIO_FIELDS = ("trio_prompt_ids", "trio_ordinal", "trio_num_keep", TEXT_ROWS_FIELD)


class TrioLlavaNextProcessingInfo(LlavaNextProcessingInfo):
    def get_trio_config(self) -> TrioConfig:
        return TrioConfig.from_hf_config(self.get_hf_config())


class TrioLlavaNextMultiModalProcessor(LlavaNextMultiModalProcessor[TrioLlavaNextProcessingInfo]):
    """LLaVA-NeXT processor that sizes each image's placeholders to k."""

    def apply(self, inputs: ProcessorInputs, timing_ctx):  # type: ignore[override]
        inputs = self._with_request_context(inputs)
        out = super().apply(inputs, timing_ctx)
        if inputs.cache is not None and (
            len(out["prompt_token_ids"]) >= self.info.ctx.model_config.max_model_len
        ):
            self._forget_sent_items(inputs.cache, out["mm_hashes"])
        return out

    @staticmethod
    def _forget_sent_items(cache, mm_hashes: Mapping[str, Sequence[str]]) -> None:
        """Drop this request's items from the API server's sender cache.

        Why: vLLM refuses a prompt that leaves no room for output only after
        multimodal processing, when its sender cache already records the items
        as sent to the engine; the request never reaches the engine, so the
        next request with the same image would be sent without data and fail
        once with a 500 (vLLM 0.32 "P0/P1 cache drift"). Forgetting them makes
        that next request carry the data again; at worst it costs a resend.
        """
        for hashes in mm_hashes.values():
            for item_hash in hashes:
                cache.invalidate(item_hash)

    def get_dummy_inputs(self, seq_len, mm_counts, mm_options) -> ProcessorInputs:  # type: ignore[override]
        # Profiling must see the largest possible item: no pruning.
        inputs = super().get_dummy_inputs(seq_len, mm_counts, mm_options)
        return replace(inputs, hf_processor_mm_kwargs={KEEP_RATIO_KWARG: 1.0})

    def _with_request_context(self, inputs: ProcessorInputs) -> ProcessorInputs:
        """Resolve the ratio and depth, and bind the prompt into the kwargs."""
        cfg = self.info.get_trio_config()
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        ratio = validate_keep_ratio(kwargs.get(KEEP_RATIO_KWARG, cfg.keep_ratio), KEEP_RATIO_KWARG)
        kwargs[KEEP_RATIO_KWARG] = ratio
        kwargs[_DEPTH_KWARG] = cfg.depth
        kwargs[_MODE_KWARG] = cfg.mode
        kwargs.pop(_ORDINALS_KWARG, None)
        # The prompt travels in the kwargs (not in processor state: requests
        # are processed on a thread pool), which also puts it in the hash.
        if ratio < 1.0:
            kwargs[_PROMPT_KWARG] = tuple(int(t) for t in inputs.prompt)
        else:
            kwargs.pop(_PROMPT_KWARG, None)
        return replace(inputs, hf_processor_mm_kwargs=kwargs)

    def _get_mm_hashes(self, inputs: ProcessorInputs):  # type: ignore[override]
        hashes = super()._get_mm_hashes(inputs)
        if KEEP_RATIO_KWARG not in inputs.hf_processor_mm_kwargs:
            return hashes
        # The same image twice in one prompt sits at two places in the text,
        # so its selection differs: salt by ordinal.
        return {
            modality: [_salt(h, i) for i, h in enumerate(items)]
            for modality, items in hashes.items()
        }

    def _get_cache_missing_processor_kwargs(self, inputs, mm_is_cached):  # type: ignore[override]
        kwargs = dict(super()._get_cache_missing_processor_kwargs(inputs, mm_is_cached))
        cached = mm_is_cached.get("image", [])
        kwargs[_ORDINALS_KWARG] = tuple(i for i, hit in enumerate(cached) if not hit)
        return kwargs

    def _call_hf_processor(self, hf_data, hf_kwargs) -> BatchFeature:  # type: ignore[override]
        trio_kwargs = {k: v for k, v in hf_kwargs.items() if k in _TRIO_KWARGS}
        stock_kwargs = {k: v for k, v in hf_kwargs.items() if k not in _TRIO_KWARGS}
        out = super()._call_hf_processor(hf_data, stock_kwargs)
        if KEEP_RATIO_KWARG in trio_kwargs and "image_sizes" in out:
            out.update(self._trio_item_fields(out["image_sizes"], trio_kwargs))
        return out

    def _trio_item_fields(
        self, image_sizes: torch.Tensor, trio_kwargs: Mapping[str, object]
    ) -> dict[str, object]:
        num_items = image_sizes.shape[0]
        ratio = float(trio_kwargs[KEEP_RATIO_KWARG])
        ordinals = trio_kwargs.get(_ORDINALS_KWARG) or tuple(range(num_items))
        if len(ordinals) != num_items:
            raise RuntimeError("TRIO: item ordinals do not match the processed images")
        prompt = torch.tensor(trio_kwargs.get(_PROMPT_KWARG, ()), dtype=torch.long)
        cfg = self.info.get_trio_config()
        image_token_id = self.info.get_hf_config().image_token_index
        num_keep, text_rows = [], []
        for h, w in image_sizes.tolist():
            n = self.info.get_num_image_tokens(image_width=int(w), image_height=int(h))
            k = num_kept_tokens(n, ratio)
            if k < n:
                self._check_scoring_context(prompt, n)
            num_keep.append(k)
            text_rows.append(
                num_text_rows(prompt.tolist(), image_token_id, n, k, cfg.mode, cfg.depth)
            )
        return {
            "trio_prompt_ids": [prompt] * num_items,
            "trio_ordinal": torch.tensor(ordinals, dtype=torch.long),
            "trio_num_keep": torch.tensor(num_keep, dtype=torch.long),
            TEXT_ROWS_FIELD: torch.tensor(text_rows, dtype=torch.long),
        }

    def _check_scoring_context(self, prompt: torch.Tensor, num_tokens: int) -> None:
        """Refuse (HTTP 400) an image whose unpruned scoring context exceeds max_model_len.

        The side pass scores an image inside its prompt with all ``num_tokens``
        visual tokens present (the model's ``_side_pass_context``: the text
        without any ``<image>`` placeholder, plus this image's N rows). vLLM
        only checks the *pruned* prompt, so without this check a long prompt
        would send the side pass past the rotary table (an index error that
        kills the engine) and past the sequence length the operator sized the
        server for. Checked here, in the API server, so the client gets a 400
        before any engine work.
        """
        max_len = self.info.ctx.model_config.max_model_len
        image_token_id = self.info.get_hf_config().image_token_index
        text_len = int((prompt != image_token_id).sum())
        if text_len + num_tokens > max_len:
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(
                f"vllm-trio scores each image in its unpruned prompt: {text_len} text "
                f"tokens + {num_tokens} visual tokens = {text_len + num_tokens} tokens, "
                f"which exceeds the model's maximum context length ({max_len}) even "
                f"though the pruned prompt may fit. Shorten the text, send a smaller "
                f"image, or use keep_ratio 1 (no pruning).",
                parameter="input_tokens",
                value=text_len + num_tokens,
            )

    def _get_mm_fields_config(
        self, hf_inputs, hf_processor_mm_kwargs
    ) -> Mapping[str, MultiModalFieldConfig]:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        for name in TRIO_FIELDS:
            fields[name] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return fields

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


def _salt(item_hash: str, ordinal: int) -> str:
    return hashlib.sha256(f"{item_hash}:trio-item-{ordinal}".encode()).hexdigest()
