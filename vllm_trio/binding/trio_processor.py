"""The family-independent half of TRIO's multimodal processor (one mixin).

Each family's processor (``processor`` for LLaVA-NeXT, ``qwen2_5_vl``) puts
:class:`TrioProcessorMixin` before vLLM's stock processor and adds only what
differs: which token is the image placeholder, how many visual tokens each
processed image has, and how the prompt update writes k placeholders.

What the mixin does for every family: the prompt gets k = f(N, r)
placeholder tokens per image, so vLLM's scheduler allocates KV blocks for the
pruned prompt in every layer (the shape of vLLM's EVS video pruning). Each
image item also carries what the model's side pass needs: the prompt's token
ids, which image it is, k and the depth.

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
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageProcessorItems
from vllm.multimodal.processing.inputs import ProcessorInputs

from .. import metrics
from ..config import TrioConfig
from ..core.budget import num_kept_tokens, validate_keep_ratio
from ..requests.keep_ratio import KEEP_RATIO_KWARG
from .layer_mode import TEXT_ROWS_FIELD, num_text_rows

#: Request-level processor kwargs understood by TRIO. ``trio_keep_ratio`` is
#: public (offline: ``mm_processor_kwargs={"trio_keep_ratio": r}``); the
#: others are filled in by the processor itself.
_PROMPT_KWARG = "trio_prompt"
_DEPTH_KWARG = "trio_depth"
_MODE_KWARG = "trio_mode"
_ORDINALS_KWARG = "trio_item_ordinals"
#: Marks the profiling run's dummy inputs, which are not served images.
_PROFILING_KWARG = "trio_profiling"
TRIO_KWARGS = frozenset(
    {KEEP_RATIO_KWARG, _PROMPT_KWARG, _DEPTH_KWARG, _MODE_KWARG, _ORDINALS_KWARG, _PROFILING_KWARG}
)

#: Per-image fields handed to the model with the pixels (the depth is
#: server-wide and read from the config; it is in the kwargs for the hash).
TRIO_FIELDS = ("trio_prompt_ids", "trio_ordinal", "trio_num_keep", TEXT_ROWS_FIELD)


class TrioProcessingInfoMixin:
    """Adds the server-wide TRIO settings to a family's ``ProcessingInfo``."""

    def get_trio_config(self) -> TrioConfig:
        return TrioConfig.from_hf_config(self.get_hf_config())  # type: ignore[attr-defined]


class TrioProcessorMixin:
    """Sizes each image's placeholders to k; put it before the stock processor.

    A family implements :meth:`_trio_image_token_id` and
    :meth:`_trio_num_image_tokens`, and writes k placeholders in its
    ``_get_prompt_updates`` when an item carries ``trio_num_keep``.
    """

    info: object  # the family's ProcessingInfo (with TrioProcessingInfoMixin)

    def _trio_image_token_id(self) -> int:
        """The id of the image placeholder token in the unexpanded prompt."""
        raise NotImplementedError

    def _trio_num_image_tokens(self, out: BatchFeature) -> list[int] | None:
        """Visual tokens N of each image the HF processor produced (None: no images)."""
        raise NotImplementedError

    def apply(self, inputs: ProcessorInputs, timing_ctx):  # type: ignore[override]
        inputs = self._with_request_context(inputs)
        out = super().apply(inputs, timing_ctx)  # type: ignore[misc]
        if inputs.cache is not None and (
            len(out["prompt_token_ids"]) >= self.info.ctx.model_config.max_model_len
        ):
            self._forget_sent_items(inputs.cache, out["mm_hashes"])
        elif _PROFILING_KWARG not in inputs.hf_processor_mm_kwargs:
            self._record_metrics(inputs, out)
        return out

    def _trio_count_image_tokens(self, width: int, height: int) -> int:
        """N, the visual tokens of an image of this size (families may override)."""
        return self.info.get_num_image_tokens(image_width=width, image_height=height)

    def _record_metrics(self, inputs: ProcessorInputs, out: Mapping[str, object]) -> None:
        """Visual tokens before/after and the ratio, per image (``/metrics``).

        From the request's images and the placeholders given to them, so that
        processor-cache hits (whose items are not re-processed) count too.
        """
        images = inputs.mm_data_items.get("image")
        placeholders = out["mm_placeholders"].get("image", [])  # type: ignore[attr-defined]
        if not isinstance(images, ImageProcessorItems) or len(placeholders) != len(images):
            return  # no images, or precomputed embeddings (never pruned)
        ratio = float(inputs.hf_processor_mm_kwargs[KEEP_RATIO_KWARG])
        model_name = self.info.ctx.model_config.served_model_name
        for i in range(len(placeholders)):
            size = images.get_image_size(i)
            n = self._trio_count_image_tokens(size.width, size.height)
            # k as the processor computed it (in layer mode the range also
            # holds the handed-over text rows).
            metrics.record_image(model_name, n, num_kept_tokens(n, ratio), ratio)

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
        inputs = super().get_dummy_inputs(seq_len, mm_counts, mm_options)  # type: ignore[misc]
        return replace(
            inputs, hf_processor_mm_kwargs={KEEP_RATIO_KWARG: 1.0, _PROFILING_KWARG: True}
        )

    def _with_request_context(self, inputs: ProcessorInputs) -> ProcessorInputs:
        """Resolve the ratio and depth, and bind the prompt into the kwargs."""
        cfg = self.info.get_trio_config()
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        ratio = validate_keep_ratio(kwargs.get(KEEP_RATIO_KWARG, cfg.keep_ratio), KEEP_RATIO_KWARG)
        kwargs[KEEP_RATIO_KWARG] = ratio
        kwargs[_DEPTH_KWARG] = cfg.depth
        kwargs[_MODE_KWARG] = cfg.mode  # input- and layer-mode items never share a cache entry
        kwargs.pop(_ORDINALS_KWARG, None)
        # The prompt travels in the kwargs (not in processor state: requests
        # are processed on a thread pool), which also puts it in the hash.
        if ratio < 1.0:
            kwargs[_PROMPT_KWARG] = tuple(int(t) for t in inputs.prompt)
        else:
            kwargs.pop(_PROMPT_KWARG, None)
        return replace(inputs, hf_processor_mm_kwargs=kwargs)

    def _get_mm_hashes(self, inputs: ProcessorInputs):  # type: ignore[override]
        hashes = super()._get_mm_hashes(inputs)  # type: ignore[misc]
        if KEEP_RATIO_KWARG not in inputs.hf_processor_mm_kwargs:
            return hashes
        # The same image twice in one prompt sits at two places in the text,
        # so its selection differs: salt by ordinal.
        return {
            modality: [_salt(h, i) for i, h in enumerate(items)]
            for modality, items in hashes.items()
        }

    def _get_cache_missing_processor_kwargs(self, inputs, mm_is_cached):  # type: ignore[override]
        kwargs = dict(super()._get_cache_missing_processor_kwargs(inputs, mm_is_cached))  # type: ignore[misc]
        cached = mm_is_cached.get("image", [])
        kwargs[_ORDINALS_KWARG] = tuple(i for i, hit in enumerate(cached) if not hit)
        return kwargs

    def _call_hf_processor(self, hf_data, hf_kwargs) -> BatchFeature:  # type: ignore[override]
        trio_kwargs = {k: v for k, v in hf_kwargs.items() if k in TRIO_KWARGS}
        out = super()._call_hf_processor(hf_data, stock_kwargs(hf_kwargs))  # type: ignore[misc]
        if KEEP_RATIO_KWARG in trio_kwargs:
            counts = self._trio_num_image_tokens(out)
            if counts is not None:
                out.update(self._trio_item_fields(counts, trio_kwargs))
        return out

    def _trio_item_fields(
        self, counts: list[int], trio_kwargs: Mapping[str, object]
    ) -> dict[str, object]:
        num_items = len(counts)
        ratio = float(trio_kwargs[KEEP_RATIO_KWARG])
        ordinals = trio_kwargs.get(_ORDINALS_KWARG) or tuple(range(num_items))
        if len(ordinals) != num_items:
            raise RuntimeError("TRIO: item ordinals do not match the processed images")
        prompt = torch.tensor(trio_kwargs.get(_PROMPT_KWARG, ()), dtype=torch.long)
        cfg = self.info.get_trio_config()
        num_keep, text_rows = [], []
        for n in counts:
            k = num_kept_tokens(n, ratio)
            if k < n:
                self._check_scoring_context(prompt, n)
            num_keep.append(k)
            text_rows.append(
                num_text_rows(
                    prompt.tolist(), self._trio_image_token_id(), n, k, cfg.mode, cfg.depth
                )
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
        without any image placeholder, plus this image's N rows). vLLM
        only checks the *pruned* prompt, so without this check a long prompt
        would send the side pass past the rotary table (an index error that
        kills the engine) and past the sequence length the operator sized the
        server for. Checked here, in the API server, so the client gets a 400
        before any engine work.
        """
        max_len = self.info.ctx.model_config.max_model_len
        text_len = int((prompt != self._trio_image_token_id()).sum())
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
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))  # type: ignore[misc]
        for name in TRIO_FIELDS:
            fields[name] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return fields


def stock_kwargs(hf_kwargs: Mapping[str, object]) -> dict[str, object]:
    """The processor kwargs without TRIO's (what the stock HF processor understands)."""
    return {k: v for k, v in hf_kwargs.items() if k not in TRIO_KWARGS}


def _salt(item_hash: str, ordinal: int) -> str:
    return hashlib.sha256(f"{item_hash}:trio-item-{ordinal}".encode()).hexdigest()
