"""Qwen2.5-VL with TRIO: what differs from LLaVA-NeXT (positions, layer bias, rotary).

The shared halves are ``trio_processor.TrioProcessorMixin`` (k placeholders
per image, salted hashes, profiling, the scoring-context 400) and
``trio_model.TrioModelMixin`` (the side pass per image, the selection log).
Qwen2.5-VL adds M-RoPE: three positions per token, which pruning must keep
exact. How, without the runner knowing the selection:

* ``get_mrope_input_positions`` (called once per request, before any
  selection exists) gives the text after each pruned image the position it
  has in the *unpruned* prompt (``base + max(h, w)``), and the image's k
  placeholders provisional positions inside the image's span. So every text
  position, and the decode offset, are exact from the start: a prefix-cache
  hit that skips the image entirely needs nothing else.
* ``embed_multimodal`` returns the k kept rows, each with its ``(t, h, w)``
  in the image grid as extra columns (vLLM's convention for pruned media).
* ``recompute_mrope_positions`` (called by the runner in every step that
  consumes media rows, with pruning switched on by
  ``vllm_trio.patches.mm_pruning_runners``) strips those columns and writes
  ``base + (t, h, w)`` at exactly the placeholders this step fills, also
  when chunked prefill splits an image. vLLM's own EVS recompute is not used:
  it places text after a tall image by the grid width, and misplaces an
  image that starts a step after another image finished in an earlier one.

The side pass scores an image in its unpruned prompt with the same 3-row
positions (``core.mrope``), turned into a per-row cos/sin table for the
plain layer. Videos keep stock behaviour (never pruned, stock positions).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

import torch
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from ..core import Rotary
from ..core.mrope import image_grid_positions, image_in_text_positions, mrope_cos_sin
from .side_pass import LlamaSidePass, _LayerRefs
from .trio_model import TrioModelMixin
from .trio_processor import TrioProcessingInfoMixin, TrioProcessorMixin, stock_kwargs

#: Extra columns on every media row ``embed_multimodal`` returns: ``t, h, w``
#: in the item's grid and 1 for an image row (0: a video row, left as stock).
#: They travel in the embedding dtype, exact in bfloat16 up to 256 (Qwen's
#: default ``max_pixels`` gives at most 128 merged rows or columns).
_POSITION_COLUMNS = 4


class TrioQwen2_5_VLProcessingInfo(TrioProcessingInfoMixin, Qwen2_5_VLProcessingInfo):
    pass


class TrioQwen2_5_VLMultiModalProcessor(TrioProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    """Qwen2.5-VL processor that gives each image k ``<|image_pad|>`` tokens."""

    def _trio_image_token_id(self) -> int:
        return self.info.get_hf_config().image_token_id

    def _trio_num_image_tokens(self, out: BatchFeature) -> list[int] | None:
        if "image_grid_thw" not in out:
            return None
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        return [int(g.prod()) // merge**2 for g in out["image_grid_thw"]]

    def _trio_count_image_tokens(self, width: int, height: int) -> int:
        return self.info.get_num_image_tokens(
            image_width=width,
            image_height=height,
            image_processor=self.info.get_image_processor(),
            mm_kwargs={},
        )

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        updates = super()._get_prompt_updates(
            mm_items, stock_kwargs(hf_processor_mm_kwargs), out_mm_kwargs
        )
        image_token_id = self._trio_image_token_id()
        stock = next(u for u in updates if u.modality == "image")

        def replacement(item_idx: int) -> list[int]:
            item = out_mm_kwargs["image"][item_idx]
            if "trio_num_keep" in item:
                return [image_token_id] * int(item["trio_num_keep"].data)
            return stock.replacement(item_idx)  # type: ignore[operator]

        image = PromptReplacement(
            modality="image", target=[image_token_id], replacement=replacement
        )
        return [image if u.modality == "image" else u for u in updates]


class Qwen2SidePass(LlamaSidePass):
    """The side pass over vLLM's Qwen2 layers (qkv bias) with 3-row M-RoPE positions."""

    def rotary_at(
        self, refs: _LayerRefs, positions: torch.Tensor | None, seq_len: int, device
    ) -> tuple[Rotary, torch.Tensor]:
        if positions is None or positions.ndim == 1:
            return super().rotary_at(refs, positions, seq_len, device)
        rope = refs.rotary_module
        if getattr(rope, "mrope_interleaved", False):
            raise NotImplementedError("vllm-trio: interleaved M-RoPE (Qwen3-VL) is not supported")
        table = mrope_cos_sin(rope.cos_sin_cache, positions.to(device), list(rope.mrope_section))
        return Rotary(table, is_neox=bool(rope.is_neox_style)), torch.arange(seq_len, device=device)


@MULTIMODAL_REGISTRY.register_processor(
    TrioQwen2_5_VLMultiModalProcessor,
    info=TrioQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class TrioQwen2_5_VLForConditionalGeneration(TrioModelMixin, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL with TRIO visual-token pruning of images at the input."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        # The runner recomputes M-RoPE positions only for pruning models
        # (``vllm_trio.patches.mm_pruning_runners`` switches it on for TRIO).
        self.is_multimodal_pruning_enabled = True
        self.init_trio(
            self.language_model,
            self.config.text_config.vocab_size,
            self.config.image_token_id,
            side_pass_cls=Qwen2SidePass,
        )

    # -- embeddings ------------------------------------------------------------

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        trio = self.pop_trio_fields(kwargs)
        by_modality = self._parse_and_validate_multimodal_inputs(**kwargs)
        merge = self.visual.spatial_merge_size
        out: list[torch.Tensor] = []
        for modality, mm_input in by_modality.items():
            if mm_input is None:
                continue
            grids = [
                (int(h) // merge, int(w) // merge)
                for _, h, w in mm_input[f"{modality}_grid_thw"].tolist()
            ]
            if modality == "video":
                for feats in self._process_video_input(mm_input):
                    out.append(_with_columns(feats, torch.zeros(3, feats.shape[0]), is_image=False))
                continue
            features = self._process_image_input(mm_input)
            positions = partial(_context_positions, grids)
            for feats, keep, (h, w) in zip(
                features, self.trio_keep(features, trio, positions), grids, strict=True
            ):
                grid = image_grid_positions(h, w)
                if keep is not None:
                    feats, grid = feats.index_select(0, keep), grid[:, keep.cpu()]
                out.append(_with_columns(feats, grid, is_image=True))
        return out

    # -- positions -------------------------------------------------------------

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list):
        """Positions of the (pruned) prompt: text exact as unpruned, k provisional image rows."""
        pieces: list[torch.Tensor] = []
        next_pos, st = 0, 0
        for offset, t, h, w, t_factor in self.iter_mm_grid_thw(mm_features):
            feature = next(f for f in mm_features if f.mm_position.offset == offset)
            length = feature.mm_position.length
            pieces.append(torch.arange(offset - st).expand(3, -1) + next_pos)
            base = next_pos + offset - st
            grid = torch.stack(
                torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            ).reshape(3, -1)
            if t_factor != 1.0:
                grid[0] = (grid[0] * t_factor).long()
            # A pruned image's k rows are placed by recompute_mrope_positions
            # once selected; until then they take the grid's first k positions.
            pieces.append(grid[:, :length] + base)
            next_pos = base + int(grid.max()) + 1
            st = offset + length
        pieces.append(torch.arange(len(input_tokens) - st).expand(3, -1) + next_pos)
        positions = torch.cat(pieces, dim=1)
        return positions, int(positions.max()) + 1 - len(input_tokens)

    def recompute_mrope_positions(
        self,
        input_ids: list[int] | torch.Tensor,
        multimodal_embeddings: Sequence[torch.Tensor],
        mrope_positions: torch.LongTensor,
        num_computed_tokens: int,
    ) -> tuple[Sequence[torch.Tensor], torch.Tensor, int]:
        """Place this step's kept image rows at ``base + (t, h, w)``; strip the columns.

        ``multimodal_embeddings`` are this request's media rows for the step,
        in prompt order: a slice of the first media item that overlaps
        ``num_computed_tokens`` onwards, then whole or leading parts of the
        next ones (vLLM's ``_gather_mm_embeddings``).
        """
        stripped = [mm[:, :-_POSITION_COLUMNS] for mm in multimodal_embeddings]
        if not multimodal_embeddings:
            return stripped, mrope_positions, _delta(mrope_positions)
        ids = torch.as_tensor(input_ids, device="cpu").long()
        runs = _media_runs(ids, (self.config.image_token_id, self.config.video_token_id))
        first = next(
            i for i, (start, length) in enumerate(runs) if start + length > num_computed_tokens
        )
        positions = mrope_positions.clone()
        for j, mm in enumerate(multimodal_embeddings):
            start, _ = runs[first + j]
            columns = mm[:, -_POSITION_COLUMNS:].float().cpu().round().long()
            if not bool(columns[0, 3]):
                continue  # a video: stock positions, never pruned
            row = max(num_computed_tokens - start, 0) if j == 0 else 0
            base = positions[0, start - 1] + 1  # the <|vision_start|> before the image is text
            positions[:, start + row : start + row + mm.shape[0]] = (
                columns[:, :3].T.to(positions) + base
            )
        return stripped, positions, _delta(positions)


def _context_positions(
    grids: list[tuple[int, int]], item: int, before: int, after: int
) -> torch.Tensor:
    """Side-pass positions of image ``item`` in its unpruned prompt (``core.mrope``)."""
    h, w = grids[item]
    return image_in_text_positions(before, h, w, after)


def _with_columns(feats: torch.Tensor, grid: torch.Tensor, is_image: bool) -> torch.Tensor:
    """``feats`` ``[n, D]`` with the rows' ``t, h, w`` and the image flag appended."""
    flag = torch.full((1, feats.shape[0]), float(is_image))
    columns = torch.cat([grid.float(), flag]).T.to(feats.device, feats.dtype)
    return torch.cat([feats, columns], dim=1)


def _media_runs(ids: torch.Tensor, media_ids: tuple[int, ...]) -> list[tuple[int, int]]:
    """``(start, length)`` of each maximal run of media placeholder tokens, in order."""
    is_media = torch.isin(ids, torch.tensor(media_ids))
    edges = torch.diff(is_media.long(), prepend=torch.zeros(1, dtype=torch.long))
    starts = torch.nonzero(edges == 1).squeeze(1).tolist()
    ends = [*torch.nonzero(edges == -1).squeeze(1).tolist(), ids.numel()]
    return [(s, next(e for e in ends if e > s) - s) for s in starts]


def _delta(positions: torch.Tensor) -> int:
    return int(positions.max()) + 1 - positions.shape[1]
