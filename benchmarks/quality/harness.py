"""Answer quality under visual-token pruning: TRIO (three ways) against baselines.

    .venv/bin/python -m benchmarks.quality.harness [--n 1002] \
        [--ratios 1 0.333 0.222 0.111 0.05] [--model benchmarks/quality/model] [--quick]
    .venv/bin/python -m benchmarks.quality.harness --part --arms ... --out A  # one core's share
    .venv/bin/python -m benchmarks.quality.harness --merge A.part.json B.part.json

Evaluates the first ``--n`` questions of the eval split of the scenes the
model was trained on (its ``TRAINING.json`` names the generator,
``grid_scenes``), and writes
``benchmarks/results/quality.json``, ``.md`` and ``.svg``: per arm and keep
ratio, accuracy per family and overall with 95% intervals, relative to stock
vLLM's unpruned accuracy, visual tokens per layer, KV tokens per request and
an exact McNemar test against TRIO in vLLM at the default depth (``table``).
Every arm answers the same questions with the same prompts, greedy decoding,
the same ``max_tokens``. ``--quick`` is the CI-sized form.

Arms (``k = num_kept_tokens(N, r)`` visual tokens of the image's ``N``):

* ``stock-vllm``: stock vLLM LLaVA-NeXT, unpruned (ratio 1 only); the
  reference accuracy of the "rel" column.
* ``hf-unpruned``: HF transformers, unpruned, through the same generation
  helper as the input-pruning arms; must match ``stock-vllm``.
* ``trio-vllm@L``: the product: vLLM with TRIO on
  (``vllm_trio.engine_kwargs(depth=L)``), the ratio per request through
  ``mm_processor_kwargs``; tokens are scored at depth L, dropped at the input.
* ``trio-layer@L``: vLLM with TRIO in layer mode
  (``engine_kwargs(depth=L, mode="layer")``): the same k tokens of KV as
  ``trio-vllm@L``, with the side pass's full-context states handed to layer L
  (``vllm_trio.binding.layer_mode``); its first token equals ``trio-ref@L``'s.
* ``trio-ref@L``: the paper-faithful reference, pruning *inside* the LLM at
  layer L (``trio_dev.reference.generate_hf`` with ``Schedule.single(L, k)``):
  layers below L see every token.
* ``trio-ref-matched@L``: the same, keeping fewer tokens from layer L so that
  the average visual tokens per layer equal the input arms' k (or reported
  infeasible); ``trio-ref-multi``: three stages at about layers 1, n/3, n/2
  shaped like the reference's schedule (``multi_schedule``).
* ``trio+ve``: the vision-encoder stage (per tile: [CLS]-attention window and
  global picks, dropped tokens merged into kept ones), then TRIO's gradient
  stage at the default depth on the survivors, pruning at the input (HF).
  Budget: the VE stage keeps ``b = min(p*p, ceil(ve_factor * k / T))``
  patches in each of the image's ``T`` tiles (``ve_factor`` 3 as the
  reference's 96 -> 32 tokens), all image-newline tokens survive (the
  reference's LLaVA-NeXT variant); the gradient stage then keeps exactly
  ``k`` of those survivors, so the LLM sees as many visual tokens as in every
  other arm. Should unpadding leave fewer than ``k`` survivors, the VE stage
  keeps every patch of every tile (no merging) for that image.
* input-pruning baselines on the HF path (``trio_dev.baselines``):
  ``random``, ``grid``, ``cls-attn`` (VisionZip-style, penultimate CLIP
  layer), ``text-attn`` (FastV-style, layer K = 2), ``diversity`` (k-center).
* ``trio-hf@L`` (only when named in ``--arms``): TRIO at the input on the HF
  path, a cross-check of ``trio-vllm@L`` outside vLLM.

All HF input-pruning arms share one helper: the pruned prompt is the text
embeddings plus the kept visual embeddings in their original order, positions
renumbered contiguously: exactly what the vLLM plugin feeds the LLM.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from transformers import (
    AutoProcessor,
    DynamicCache,
    LlavaNextForConditionalGeneration,
)
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

from trio_dev.baselines import (
    PackedLayout,
    cls_attention_select,
    diversity_select,
    grid_select,
    llava_next_layout,
    random_select,
    text_attention_select,
)
from trio_dev.hf_adapter import core_fns_from_hf
from trio_dev.reference import generate_hf
from trio_dev.vision_stage import merge_dropped, vision_stage_select
from vllm_trio.config import DEFAULT_DEPTH
from vllm_trio.core import (
    Schedule,
    TrioParams,
    num_kept_tokens,
    select_visual_tokens,
)

from . import grid_scenes
from .grid_scenes import Sample, chat_prompt
from .shipped import MODEL_DIR, scene_generator, training_record
from .table import ArmResult, markdown, summarise, svg_plot

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "quality"
DEFAULT_RATIOS = (1.0, 0.333, 0.222, 0.111, 0.05)
INPUT_BASELINES = ("random", "grid", "cls-attn", "text-attn", "diversity")
DEFAULT_ARMS = (
    "stock-vllm",
    "hf-unpruned",
    "trio-vllm",
    "trio-layer",
    "trio-ref",
    "trio-ref-matched",
    "trio-ref-multi",
    "trio+ve",
    *INPUT_BASELINES,
)
#: The reference's multi-stage LLaVA-1.5 schedule without VE: layers [1, 10, 15]
#: of 32 keeping [92, 54, 22] of 576 tokens (an average of 64 = 11.1%).
REF_MULTI_LAYERS, REF_MULTI_KEEPS, REF_TOKENS, REF_LAYERS = (1, 10, 15), (92, 54, 22), 576, 32
#: Reference (ocy1/TRIO, LLaVA, CLIP ViT-L/14 with 24 layers): the window
#: stage reads layer 5's [CLS] attention; scaled to other vision depths.
REF_SHALLOW_LAYER, REF_VISION_LAYERS = 5, 24


def log(start: float, message: str) -> None:
    """Progress line with the elapsed wall time (a long benchmark must show life)."""
    print(f"[{time.perf_counter() - start:7.1f}s] {message}", flush=True)


# --------------------------------------------------------------------------- #
# Per-sample data shared by the HF arms
# --------------------------------------------------------------------------- #


@dataclass
class Prepared:
    """One eval sample, encoded once for every HF arm.

    ``embeds`` is the full prompt (text embeddings with the packed visual
    embeddings at ``visual_rows``), as ``LlavaNextModel.forward`` builds it.
    """

    index: int
    sample: Sample
    input_ids: torch.Tensor  # [S]
    pixel_values: torch.Tensor
    image_sizes: torch.Tensor
    embeds: torch.Tensor  # [S, D]
    visual_rows: torch.Tensor  # [N]
    layout: PackedLayout
    tile_features: torch.Tensor  # [T, p*p, D] projected, before packing
    cls_shallow: torch.Tensor  # [T, p*p] [CLS] attention (head mean), window stage
    cls_deep: torch.Tensor  # [T, p*p] [CLS] attention (head mean), penultimate layer
    text_attn: torch.Tensor  # [heads, N] last prompt token -> visual tokens, layer K

    @property
    def num_visual(self) -> int:
        return int(self.visual_rows.numel())


class HFRunner:
    """The HF-transformers side: encoding, pruned-prompt generation, TRIO scoring."""

    def __init__(self, model_dir: Path, max_new_tokens: int, fastv_k: int) -> None:
        # Eager attention: the baselines read attention weights (CLIP's [CLS]
        # row, the LLM's last-token row), which SDPA does not return.
        self.model = LlavaNextForConditionalGeneration.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.tokenizer = self.processor.tokenizer
        self.config = self.model.config
        self.lm = self.model.model.language_model
        self.num_layers = len(self.lm.layers)
        self.max_new_tokens = max_new_tokens
        self.eos = self.tokenizer.eos_token_id
        if not 1 <= fastv_k <= self.num_layers:
            raise ValueError(f"--fastv-k must be in [1, {self.num_layers}], got {fastv_k}")
        self.fastv_k = fastv_k
        vcfg = self.config.vision_config
        if self.config.vision_feature_select_strategy != "default" or not isinstance(
            self.config.vision_feature_layer, int
        ):
            raise NotImplementedError("the harness expects LLaVA-NeXT's default feature selection")
        self.patches_per_side = vcfg.image_size // vcfg.patch_size
        vision_layers = vcfg.num_hidden_layers
        self.deep_layer = vision_layers + self.config.vision_feature_layer
        if self.config.vision_feature_layer >= 0:
            self.deep_layer = self.config.vision_feature_layer - 1
        shallow = round(REF_SHALLOW_LAYER * vision_layers / REF_VISION_LAYERS)
        self.shallow_layer = min(max(shallow, 0), vision_layers - 1)
        self.window = max(1, self.patches_per_side // 4)  # 6 of 24 in the reference

    # -- encoding ----------------------------------------------------------- #

    @torch.no_grad()
    def prepare(self, index: int, sample: Sample) -> Prepared:
        enc = self.processor(
            images=sample.image, text=chat_prompt(sample.question), return_tensors="pt"
        )
        input_ids = enc["input_ids"][0]
        sizes = enc["image_sizes"]
        cfg = self.config
        num_tiles = image_size_to_num_patches(
            sizes[0], cfg.image_grid_pinpoints, cfg.vision_config.image_size
        )
        pixels = enc["pixel_values"][0, :num_tiles]
        vis = self.model.model.vision_tower(
            pixels, output_hidden_states=True, output_attentions=True
        )
        tile_features = self.model.model.multi_modal_projector(
            vis.hidden_states[cfg.vision_feature_layer][:, 1:]
        )
        cls_deep = vis.attentions[self.deep_layer][:, :, 0, 1:].mean(dim=1)
        cls_shallow = vis.attentions[self.shallow_layer][:, :, 0, 1:].mean(dim=1)

        tile_grid = get_anyres_image_grid_shape(
            sizes[0].tolist(), cfg.image_grid_pinpoints, cfg.vision_config.image_size
        )
        layout = llava_next_layout(
            self.patches_per_side, tuple(tile_grid) if num_tiles > 1 else None, sizes[0].tolist()
        )
        packed = self.pack(tile_features, layout)
        # The layout must reproduce HF's own packing, token for token.
        hf_packed, _ = self.model.model.pack_image_features(
            [tile_features], sizes, "default", image_newline=self.model.model.image_newline
        )
        if not torch.equal(packed, hf_packed[0]):
            raise RuntimeError("packed layout differs from HF's pack_image_features")

        visual_rows = torch.nonzero(input_ids == cfg.image_token_id).squeeze(1)
        if visual_rows.numel() != packed.shape[0]:
            raise RuntimeError("processor placeholders and packed features disagree")
        embeds = self.model.get_input_embeddings()(input_ids).clone()
        embeds[visual_rows] = packed.to(embeds.dtype)

        attn = self.lm(inputs_embeds=embeds[None], output_attentions=True).attentions
        # FastV with K: rank by the attention map of decoder layer K (1-based),
        # the one in hand when pruning before layer K; the last prompt token's row.
        text_attn = attn[self.fastv_k - 1][0, :, -1, :][:, visual_rows]
        return Prepared(
            index=index,
            sample=sample,
            input_ids=input_ids,
            pixel_values=enc["pixel_values"],
            image_sizes=sizes,
            embeds=embeds,
            visual_rows=visual_rows,
            layout=layout,
            tile_features=tile_features,
            cls_shallow=cls_shallow,
            cls_deep=cls_deep,
            text_attn=text_attn,
        )

    def pack(self, tile_features: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        """Packed visual embeddings ``[N, D]`` from per-tile features, via ``layout``."""
        p2 = self.patches_per_side**2
        flat = tile_features.reshape(-1, tile_features.shape[-1])
        src = layout.tile.clamp(min=0) * p2 + layout.patch.clamp(min=0)
        out = flat.index_select(0, src)
        newline = self.model.model.image_newline.to(out.dtype)
        return torch.where(layout.is_newline[:, None], newline[None], out)

    # -- generation --------------------------------------------------------- #

    def pruned_embeds(
        self, prep: Prepared, keep: torch.Tensor, visual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Text embeddings plus the kept visual rows, in prompt order.

        ``visual`` ``[N', D]`` replaces the prompt's visual embeddings (the VE
        arm's merged survivors); ``keep`` indexes it (default: the packed ones).
        Row order is the original order; positions are renumbered ``0..S'-1``
        simply by being a new, shorter sequence.
        """
        vis = prep.embeds[prep.visual_rows] if visual is None else visual
        first = int(prep.visual_rows[0])
        last = int(prep.visual_rows[-1])
        if last - first + 1 != prep.num_visual:
            raise RuntimeError("the harness expects one contiguous image per prompt")
        return torch.cat([prep.embeds[:first], vis[keep], prep.embeds[last + 1 :]])

    @torch.no_grad()
    def generate(self, embeds: torch.Tensor) -> list[int]:
        """Greedy decoding from prompt embeddings ``[S, D]`` with a KV cache."""
        cache = DynamicCache(config=self.lm.config)
        out = self.lm(inputs_embeds=embeds[None], past_key_values=cache, use_cache=True)
        tokens: list[int] = []
        while True:
            logits = self.model.lm_head(out.last_hidden_state[0, -1])
            tokens.append(int(logits.argmax()))
            if tokens[-1] == self.eos or len(tokens) >= self.max_new_tokens:
                return tokens
            step = self.model.get_input_embeddings()(torch.tensor([[tokens[-1]]]))
            out = self.lm(inputs_embeds=step, past_key_values=out.past_key_values, use_cache=True)

    def decode(self, tokens: Sequence[int]) -> str:
        """Text of ``tokens`` as vLLM's detokenizer reports it.

        A byte-level token sequence cut off by ``max_tokens`` can end inside a
        multi-byte character: HF decodes it as U+FFFD, vLLM's incremental
        detokenizer withholds the incomplete bytes. Dropping trailing U+FFFD
        makes the HF and vLLM arms compare answers, not detokenizers.
        """
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True).rstrip("\ufffd")

    # -- TRIO on the HF path ------------------------------------------------ #

    def trio_input_keep(
        self, embeds: torch.Tensor, visual_rows: torch.Tensor, k: int, depth: int
    ) -> torch.Tensor:
        """TRIO's selection scored at ``depth`` over ``embeds``, for pruning at the input."""
        if k >= visual_rows.numel():
            return torch.arange(visual_rows.numel())
        with torch.no_grad():
            hidden = self.lm(inputs_embeds=embeds[None], output_hidden_states=True).hidden_states
        sel = select_visual_tokens(
            hidden[depth][0],
            visual_rows,
            k,
            *core_fns_from_hf(self.model, depth, embeds.shape[0]),
            params=TrioParams(),
        )
        return sel.keep

    def trio_ve(
        self, prep: Prepared, k: int, depth: int, ve_factor: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The VE arm's visual embeddings and the kept indices into them."""
        layout, p = prep.layout, self.patches_per_side
        num_tiles = layout.num_tiles
        budget = min(p * p, math.ceil(ve_factor * k / num_tiles))
        merged, survive = self._ve_stage(prep, budget)
        if int(survive.sum()) < k:
            merged, survive = self._ve_stage(prep, p * p)
        visual = merged[survive]
        text_before = int(prep.visual_rows[0])
        survivors = visual.shape[0]
        embeds = torch.cat(
            [
                prep.embeds[:text_before],
                visual,
                prep.embeds[text_before + prep.num_visual :],
            ]
        )
        rows = torch.arange(text_before, text_before + survivors)
        keep = self.trio_input_keep(embeds, rows, k, depth)
        return visual, keep

    @torch.no_grad()
    def _ve_stage(self, prep: Prepared, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per tile: window/global [CLS] picks and merging; returns packed ``[N, D]``
        features (kept tokens merged) and the survivor mask ``[N]``."""
        p = self.patches_per_side
        feats = prep.tile_features.clone()
        kept = torch.zeros(feats.shape[:2], dtype=torch.bool)
        for t in range(feats.shape[0]):
            keep = vision_stage_select(
                prep.cls_shallow[t], prep.cls_deep[t], (p, p), budget, window=self.window
            )
            if keep.numel() < p * p:
                feats[t, keep] = merge_dropped(feats[t], keep)
            kept[t, keep] = True
        lay = prep.layout
        p2 = p * p
        src = lay.tile.clamp(min=0) * p2 + lay.patch.clamp(min=0)
        survive = lay.is_newline | kept.reshape(-1)[src]
        return self.pack(feats, lay), survive


# --------------------------------------------------------------------------- #
# Arms
# --------------------------------------------------------------------------- #


def run_vllm(
    model_dir: Path,
    samples: list[Sample],
    ratios: Sequence[float],
    depth: int | None,
    max_tokens: int,
    max_model_len: int,
    seed: int,
    start: float,
    mode: str = "input",
) -> list[ArmResult]:
    """One in-process engine (stock when ``depth`` is None), all samples per ratio batched;
    ``mode`` is TRIO's ``--trio-mode``."""
    from vllm import LLM, SamplingParams

    import vllm_trio

    kwargs: dict[str, Any] = dict(
        model=str(model_dir),
        dtype="float32",  # the checkpoint's dtype; the CPU build would pick bfloat16
        enforce_eager=True,
        max_model_len=max_model_len,
        limit_mm_per_prompt={"image": 1},
        seed=seed,
    )
    kv_bytes = _kv_bytes(model_dir, max_model_len)
    kwargs["kv_cache_memory_bytes"] = kv_bytes
    if depth is not None:
        kwargs.update(vllm_trio.engine_kwargs(keep_ratio=1.0, depth=depth, mode=mode))
    arm = "trio-layer" if mode == "layer" else "trio-vllm"
    name = "stock-vllm" if depth is None else f"{arm}@{depth}"
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    _freeze_heap()
    log(start, f"{name}: engine up in {time.perf_counter() - t0:.0f}s")
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    results = []
    try:
        for ratio in ratios:
            t0 = time.perf_counter()
            reqs = []
            for s in samples:
                req: dict[str, Any] = {
                    "prompt": chat_prompt(s.question),
                    "multi_modal_data": {"image": s.image},
                }
                if depth is not None:
                    req["mm_processor_kwargs"] = {"trio_keep_ratio": ratio}
                reqs.append(req)
            outs = llm.generate(reqs, params, use_tqdm=False)
            res = ArmResult(name, ratio, depth)
            for s, o in zip(samples, outs, strict=True):
                n_prompt = len(o.prompt_token_ids)
                # Visual tokens kept = prompt minus the text (same text as HF's).
                res.add(s, o.outputs[0].text, n_prompt, -1, -1.0, -1.0)
            res.seconds = time.perf_counter() - t0
            results.append(res)
            log(start, f"{name} r={ratio:g}: acc {100 * res.accuracy:.1f}% ({res.seconds:.0f}s)")
    finally:
        # No engine_core.shutdown(): it runs full gc.collect() passes over the
        # whole heap (minutes on a loaded 2-core machine); the engine is small
        # and is dropped by reference counting.
        del llm
    return results


def _kv_bytes(model_dir: Path, max_model_len: int) -> int:
    """KV cache for four full-length requests (float32), within [64 MiB, 1.5 GiB].

    Scene prompts are far shorter than ``max_model_len``, so this holds dozens
    of them at once; vLLM queues the rest of a batch.
    """
    cfg = json.loads((model_dir / "config.json").read_text())["text_config"]
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    per_token = 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", heads) * head_dim * 4
    return max(64 << 20, min(3 << 29, 4 * max_model_len * per_token))


def run_hf_input_arm(
    hf: HFRunner,
    name: str,
    ratio: float,
    prepared: list[Prepared],
    select: Callable[[Prepared, int], tuple[torch.Tensor, torch.Tensor | None]],
    depth: int | None = None,
) -> ArmResult:
    """Generate with each sample's pruned prompt; ``select`` gives ``(keep, visual)``."""
    res = ArmResult(name, ratio, depth)
    t0 = time.perf_counter()
    for prep in prepared:
        k = num_kept_tokens(prep.num_visual, ratio)
        keep, visual = select(prep, k)
        embeds = hf.pruned_embeds(prep, keep, visual)
        text = hf.decode(hf.generate(embeds))
        kept = int(keep.numel())
        res.add(prep.sample, text, embeds.shape[0], kept, float(kept), float(embeds.shape[0]))
    res.seconds = time.perf_counter() - t0
    return res


def run_trio_ref(
    hf: HFRunner,
    name: str,
    ratio: float,
    depth: int | None,
    prepared: list[Prepared],
    schedule_for: Callable[[int, int], Schedule | None],
) -> ArmResult:
    """A paper-faithful arm: prune inside the LLM, ``schedule_for(N, k)`` per question.

    ``k = num_kept_tokens(N, ratio)`` is the input arms' budget at this ratio;
    a schedule of None means the arm cannot reach it (``ArmResult.infeasible``).
    """
    res = ArmResult(name, ratio, depth)
    t0 = time.perf_counter()
    for prep in prepared:
        n = prep.num_visual
        schedule = schedule_for(n, num_kept_tokens(n, ratio))
        if schedule is None:
            return ArmResult(name, ratio, depth, infeasible=_infeasible(hf.num_layers, depth))
        tokens = generate_hf(
            hf.model,
            prep.input_ids,
            prep.pixel_values,
            prep.image_sizes,
            schedule,
            max_new_tokens=hf.max_new_tokens,
            eos_token_id=hf.eos,
        )
        per_layer = schedule.average_kept(n, hf.num_layers)
        text_tokens = prep.input_ids.numel() - n
        kept = min(n, schedule.stages[-1].keep)
        res.add(
            prep.sample, hf.decode(tokens), prep.input_ids.numel(), kept, per_layer,
            text_tokens + per_layer,
        )  # fmt: skip
    res.seconds = time.perf_counter() - t0
    return res


def _infeasible(num_layers: int, depth: int | None) -> str:
    below = "layer 0" if depth is None else f"layers 0..{depth - 1}"
    return f"all N tokens in {below} already exceed the average per layer ({num_layers} layers)"


def matched_schedule(depth: int, num_layers: int) -> Callable[[int, int], Schedule | None]:
    """Single stage at ``depth`` keeping k' so that the average per layer equals k.

    ``(depth * N + (num_layers - depth) * k') / num_layers = k``; None when even
    k' = 1 would exceed it (the layers below ``depth`` alone hold too many).
    """

    def schedule_for(n: int, k: int) -> Schedule | None:
        if depth == 0:
            return Schedule.single(0, k)
        kept = math.floor((num_layers * k - depth * n) / (num_layers - depth))
        return Schedule.single(depth, min(n, kept)) if kept >= 1 else None

    return schedule_for


def multi_stage_layers(num_layers: int) -> tuple[int, int, int]:
    """The reference's stage layers [1, 10, 15] of 32 scaled: about 1, n/3, n/2."""
    third, half = max(2, round(num_layers / 3)), max(3, num_layers // 2)
    return 1, third, max(half, third + 1)


def multi_schedule(num_layers: int) -> Callable[[int, int], Schedule | None]:
    """Three stages shaped like the reference's (counts 92 : 54 : 22), averaging k per layer.

    The counts are scaled by one factor so that the average over layers equals
    the input arms' k. Where that is impossible (layer 0 alone holds all N), the
    reference's own fractions of N are used (16.0%, 9.4%, 3.8% of the tokens,
    an average of 11.1% on its 32 layers), and the row's vis/layer says what
    that costs on this model.
    """
    layers = multi_stage_layers(num_layers)
    spans = [b - a for a, b in zip(layers, [*layers[1:], num_layers], strict=True)]
    weight = sum(c * s for c, s in zip(REF_MULTI_KEEPS, spans, strict=True))

    def schedule_for(n: int, k: int) -> Schedule | None:
        scale = (num_layers * k - layers[0] * n) / weight
        if scale * REF_MULTI_KEEPS[-1] < 1:
            scale = n / REF_TOKENS
        keeps = [max(1, min(n, round(c * scale))) for c in REF_MULTI_KEEPS]
        return Schedule.from_lists(layers, keeps)

    return schedule_for


def baseline_selectors(
    hf: HFRunner, seed: int
) -> dict[str, Callable[[Prepared, int], tuple[torch.Tensor, None]]]:
    """Input-pruning baselines: kept indices into the packed visual tokens.

    ``random`` draws with seed ``seed * 1_000_003 + sample index``, so every
    ratio and every run sees the same stream per question.
    """

    def rand(p: Prepared, k: int) -> tuple[torch.Tensor, None]:
        return random_select(p.num_visual, k, seed * 1_000_003 + p.index), None

    def grid(p: Prepared, k: int) -> tuple[torch.Tensor, None]:
        return grid_select(p.layout, k), None

    def cls(p: Prepared, k: int) -> tuple[torch.Tensor, None]:
        return cls_attention_select(p.cls_deep, k, p.layout), None

    def text(p: Prepared, k: int) -> tuple[torch.Tensor, None]:
        return text_attention_select(p.text_attn, k), None

    def div(p: Prepared, k: int) -> tuple[torch.Tensor, None]:
        return diversity_select(p.embeds[p.visual_rows], k), None

    return {"random": rand, "grid": grid, "cls-attn": cls, "text-attn": text, "diversity": div}


# --------------------------------------------------------------------------- #
# Driver
# --------------------------------------------------------------------------- #


def resolve_model(args: argparse.Namespace, tmp: Path) -> tuple[Path, str, dict[str, Any]]:
    """The checkpoint to evaluate, what kind it is, and its training record."""
    if args.tiny:
        from trio_dev.checkpoints import build_checkpoint

        path = build_checkpoint(tmp / "tiny", preset="tiny", seed=0)
        return path, "random tiny checkpoint: plumbing only, accuracy is meaningless", {}
    path = Path(args.model)
    try:
        training = training_record(path)
    except FileNotFoundError as e:
        raise SystemExit(f"{e}; pass --tiny to check plumbing") from None
    return path, "trained on generated scenes", training


def default_depths(num_layers: int) -> list[int]:
    """The plugin's default depth plus shallower and deeper ones the model has."""
    wanted = {0, 1, DEFAULT_DEPTH, num_layers // 4}
    return sorted(d for d in wanted if 0 <= d < num_layers)


def answer_token_budget(tokenizer: Any, samples: list[Sample]) -> int:
    """Greedy ``max_tokens``: the longest answer (after a space) plus EOS."""
    lengths = [len(tokenizer.encode(" " + s.answer, add_special_tokens=False)) for s in samples]
    return max(lengths, default=1) + 1


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1002, help="eval questions (first n of the split)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="CI-sized run: 24 questions, ratios 1 and 0.111, the default depth, every arm; "
        "writes under the temp directory unless --out is given",
    )
    ap.add_argument("--seed", type=int, default=0, help="eval split seed and random-arm seed")
    ap.add_argument("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS))
    ap.add_argument("--model", default=str(MODEL_DIR))
    ap.add_argument("--tiny", action="store_true", help="random tiny checkpoint (plumbing)")
    ap.add_argument("--depths", type=int, nargs="+", help="L for trio-vllm/trio-ref")
    ap.add_argument(
        "--arms",
        nargs="+",
        default=list(DEFAULT_ARMS),
        help=f"subset of {', '.join(DEFAULT_ARMS)}, trio-hf",
    )
    ap.add_argument("--ve-depth", type=int, default=DEFAULT_DEPTH, help="L of trio+ve/trio-hf")
    ap.add_argument("--ve-factor", type=float, default=3.0, help="VE budget / final k")
    ap.add_argument("--fastv-k", type=int, default=2, help="text-attn: attention of layer K")
    ap.add_argument("--max-tokens", type=int, help="default: longest answer + EOS")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the HF arms")
    ap.add_argument("--out", help=f"output stem (.json, .md, .svg); default {DEFAULT_OUT}")
    ap.add_argument(
        "--part",
        action="store_true",
        help="write the arms' per-question results to <out>.part.json instead of the table, "
        "to be joined with --merge (runs of disjoint --arms/--depths side by side)",
    )
    ap.add_argument(
        "--merge",
        nargs="+",
        metavar="PART",
        help="build the table from --part files of one model, question set and max_tokens "
        "instead of running arms",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.ratios = 24, [1.0, 0.111]
        args.depths = args.depths or [DEFAULT_DEPTH]
        args.out = args.out or str(Path(tempfile.gettempdir()) / "trio-quality-quick")
    args.out = args.out or str(DEFAULT_OUT)
    unknown = set(args.arms) - set(DEFAULT_ARMS) - {"trio-hf"}
    if unknown:
        ap.error(f"unknown arms: {sorted(unknown)}")
    for r in args.ratios:
        if not 0 < r <= 1:
            ap.error(f"ratios must be in (0, 1], got {r}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge_parts([Path(p) for p in args.merge], Path(args.out))
    # Per-sample work on a small model is latency-bound, and OpenMP with every
    # core busy-waits badly as soon as anything else runs (measured 50x slower
    # at 2 threads on a loaded 2-core machine).
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    load_start = list(os.getloadavg())
    arms = set(args.arms)
    ratios = sorted(set(args.ratios), reverse=True)
    pruned_ratios = [r for r in ratios if r < 1.0]
    with tempfile.TemporaryDirectory(prefix="trio-quality-") as tmp:
        model_dir, kind, training = resolve_model(args, Path(tmp))
        generator = _generator(training)
        families = generator.FAMILIES
        samples = generator.make_split("eval", args.n, args.seed)
        log(start, f"{len(samples)} eval samples; model {model_dir} ({kind})")
        hf = HFRunner(model_dir, max_new_tokens=1, fastv_k=args.fastv_k)
        max_tokens = args.max_tokens or answer_token_budget(hf.tokenizer, samples)
        hf.max_new_tokens = max_tokens
        depths = args.depths or default_depths(hf.num_layers)
        if any(not 0 <= d < hf.num_layers for d in [*depths, args.ve_depth]):
            raise SystemExit(f"depths must be in [0, {hf.num_layers - 1}]")
        timings: dict[str, float] = {}
        results: list[ArmResult] = []

        t0 = time.perf_counter()
        prepared = [hf.prepare(i, s) for i, s in enumerate(samples)]
        timings["prepare"] = time.perf_counter() - t0
        _freeze_heap()
        n_vis = [p.num_visual for p in prepared]
        log(
            start,
            f"encoded {len(prepared)} samples: N = {min(n_vis)}..{max(n_vis)} visual tokens, "
            f"{hf.num_layers} layers, depths {depths}, max_tokens {max_tokens}",
        )

        if "hf-unpruned" in arms:
            res = run_hf_input_arm(
                hf, "hf-unpruned", 1.0, prepared, lambda p, k: (torch.arange(p.num_visual), None)
            )
            results.append(res)
            timings["hf-unpruned"] = res.seconds
            log(start, f"hf-unpruned: acc {100 * res.accuracy:.1f}% ({res.seconds:.0f}s)")

        selectors = baseline_selectors(hf, args.seed)
        extra: dict[str, Callable[[Prepared, int], tuple[torch.Tensor, torch.Tensor | None]]] = {}
        if "trio+ve" in arms:
            extra["trio+ve"] = lambda p, k: _swap(hf.trio_ve(p, k, args.ve_depth, args.ve_factor))
        if "trio-hf" in arms:
            extra[f"trio-hf@{args.ve_depth}"] = lambda p, k: (
                hf.trio_input_keep(p.embeds, p.visual_rows, k, args.ve_depth),
                None,
            )
        for name, select in [*selectors.items(), *extra.items()]:
            if name not in arms and not name.startswith("trio-hf"):
                continue
            depth = args.ve_depth if name.startswith(("trio+ve", "trio-hf")) else None
            for ratio in pruned_ratios:
                res = run_hf_input_arm(hf, name, ratio, prepared, select, depth)
                results.append(res)
                timings[name] = timings.get(name, 0.0) + res.seconds
                log(
                    start, f"{name} r={ratio:g}: acc {100 * res.accuracy:.1f}% ({res.seconds:.0f}s)"
                )

        ref_arms = {
            "trio-ref": [(d, lambda n, k, d=d: Schedule.single(d, k)) for d in depths],
            "trio-ref-matched": [(d, matched_schedule(d, hf.num_layers)) for d in depths],
            "trio-ref-multi": [(None, multi_schedule(hf.num_layers))],
        }
        for base, variants in ref_arms.items():
            if base not in arms:
                continue
            for d, schedule_for in variants:
                name = base if d is None else f"{base}@{d}"
                for ratio in pruned_ratios:
                    res = run_trio_ref(hf, name, ratio, d, prepared, schedule_for)
                    results.append(res)
                    timings[name] = timings.get(name, 0.0) + res.seconds
                    note = res.infeasible or f"acc {100 * res.accuracy:.1f}%"
                    log(start, f"{name} r={ratio:g}: {note} ({res.seconds:.0f}s)")

        # vLLM last: an in-process CPU engine pins OpenMP threads and disables
        # torch.set_num_threads for the rest of the process.
        max_len = min(hf.config.text_config.max_position_embeddings, 4096)
        if "stock-vllm" in arms:
            t0 = time.perf_counter()
            results += run_vllm(model_dir, samples, [1.0], None, max_tokens, max_len, 0, start)
            timings["stock-vllm"] = time.perf_counter() - t0
        if "trio-vllm" in arms and pruned_ratios:
            for d in depths:
                t0 = time.perf_counter()
                results += run_vllm(
                    model_dir, samples, pruned_ratios, d, max_tokens, max_len, 0, start
                )
                timings[f"trio-vllm@{d}"] = time.perf_counter() - t0
        if "trio-layer" in arms and pruned_ratios:
            for d in depths:
                t0 = time.perf_counter()
                results += run_vllm(
                    model_dir, samples, pruned_ratios, d, max_tokens, max_len, 0, start, "layer"
                )
                timings[f"trio-layer@{d}"] = time.perf_counter() - t0
        _fill_vllm_kept(results, prepared)

        meta = {
            "model": str(model_dir if not args.tiny else "tiny (random)"),
            "model_kind": kind,
            "training": training,
            "n": len(samples),
            "seed": args.seed,
            "ratios": ratios,
            "depths": depths,
            "default_depth": DEFAULT_DEPTH,
            "product": f"trio-vllm@{DEFAULT_DEPTH}",
            "command": "python -m benchmarks.quality.harness " + " ".join(argv or sys.argv[1:]),
            "multi_stage_layers": multi_stage_layers(hf.num_layers),
            "ve_depth": args.ve_depth,
            "ve_factor": args.ve_factor,
            "fastv_k": args.fastv_k,
            "num_layers": hf.num_layers,
            "max_tokens": max_tokens,
            "visual_tokens": {
                "min": min(n_vis),
                "max": max(n_vis),
                "mean": sum(n_vis) / len(n_vis),
            },
            "timings_s": timings,
            "runtime_s": time.perf_counter() - start,
            "host": f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
            # Other work on the machine slows every arm alike; keep it on record.
            "load_avg_start": load_start,
            "load_avg_end": list(os.getloadavg()),
        }
    out = Path(args.out)
    if args.part:
        part = out.with_suffix(".part.json")
        part.parent.mkdir(parents=True, exist_ok=True)
        raw = {"meta": meta, "results": [asdict(r) for r in results]}
        part.write_text(json.dumps(raw) + "\n")
        log(start, f"wrote {part}")
    else:
        write_table(results, samples, families, meta, out)
        log(start, f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    _freeze_heap()
    return 0


def write_table(
    results: list[ArmResult],
    samples: list[Sample],
    families: Sequence[str],
    meta: dict[str, Any],
    out: Path,
) -> None:
    """Summarise ``results`` (every arm against stock vLLM and the product) and
    write ``out`` .json, .md and .svg; prints the table."""
    results = sorted(results, key=_order)
    rows = summarise(results, samples, families, meta["num_layers"], meta["product"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    table = markdown(rows, meta, families)
    out.with_suffix(".md").write_text(table)
    title = f"{meta['n']} questions, {meta['num_layers']} layers: accuracy vs visual tokens/layer"
    out.with_suffix(".svg").write_text(svg_plot(rows, title))
    print(table)


#: Settings every part of a merged table must share: the same model, questions,
#: decoding budget and baseline settings answer every arm.
_SHARED = (
    "model",
    "training",
    "n",
    "seed",
    "max_tokens",
    "num_layers",
    "ve_depth",
    "ve_factor",
    "fastv_k",
    "visual_tokens",
    "default_depth",
    "product",
)


#: What the merged record keeps of each part.
_PART_RECORD = ("command", "runtime_s", "timings_s", "load_avg_start", "load_avg_end")


def merge_parts(parts: Sequence[Path], out: Path) -> int:
    """One table from ``--part`` runs (``--merge``): their results joined, each
    (arm, ratio) from exactly one part, compared as if one run had made them all."""
    loaded = [json.loads(p.read_text()) for p in parts]
    first = loaded[0]["meta"]
    for path, part in zip(parts, loaded, strict=True):
        differs = [k for k in _SHARED if part["meta"].get(k) != first.get(k)]
        if differs:
            raise SystemExit(f"{path} was run with other {', '.join(differs)} than {parts[0]}")
    results = [ArmResult(**r) for part in loaded for r in part["results"]]
    seen: set[tuple[str, float]] = set()
    for r in results:
        if (r.arm, r.ratio) in seen:
            raise SystemExit(f"{r.arm} at ratio {r.ratio:g} is in more than one part")
        seen.add((r.arm, r.ratio))
    metas = [part["meta"] for part in loaded]
    meta = {
        **first,
        "ratios": sorted({r for m in metas for r in m["ratios"]}, reverse=True),
        "depths": sorted({d for m in metas for d in m["depths"]}),
        "command": " + ".join(m["command"] for m in metas),
        "timings_s": {k: v for m in metas for k, v in m["timings_s"].items() if k != "prepare"},
        # The parts ran side by side: the table took the longest part's time.
        "runtime_s": max(m["runtime_s"] for m in metas),
        "parts": [{k: m[k] for k in _PART_RECORD} for m in metas],
        "load_avg_start": first["load_avg_start"],
        "load_avg_end": max((m["load_avg_end"] for m in metas), key=lambda a: a[0]),
    }
    generator = _generator(meta["training"])
    samples = generator.make_split("eval", meta["n"], meta["seed"])
    write_table(results, samples, generator.FAMILIES, meta, out)
    return 0


def _generator(training: dict[str, Any]) -> ModuleType:
    """The scenes to ask: the model's own, or ``grid_scenes`` for ``--tiny`` (no record)."""
    return scene_generator(training) if training else grid_scenes


def _freeze_heap() -> None:
    """Move every live object out of the garbage collector's sight (``gc.freeze``).

    Models, engines and prepared samples live until the end, and vLLM alone
    leaves about a million objects: each full collection (periodic, and the
    one at interpreter exit) walks all of them, measured at 40 s and more on
    a loaded 2-core machine. Frozen objects are still freed by reference
    counting; only cyclic garbage made before a freeze is never reclaimed,
    which a one-shot benchmark can afford.
    """
    gc.freeze()


def _swap(pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    visual, keep = pair
    return keep, visual


def _fill_vllm_kept(results: list[ArmResult], prepared: list[Prepared]) -> None:
    """Kept visual tokens of the vLLM arms (prompt minus text), checked against HF.

    vLLM reports prompt lengths only. Every comparison in the table assumes
    that vLLM saw the same text and image tokens as the HF arms and kept
    exactly ``num_kept_tokens(N, r)``; a mismatch would make it meaningless,
    so it stops the run.
    """
    for res in results:
        if not res.arm.startswith(("stock-vllm", "trio-vllm", "trio-layer")):
            continue
        for i, prep in enumerate(prepared):
            text_tokens = prep.input_ids.numel() - prep.num_visual
            kept = res.prompt_tokens[i] - text_tokens
            if kept != num_kept_tokens(prep.num_visual, res.ratio):
                raise RuntimeError(
                    f"{res.arm} r={res.ratio}: question {i} has {res.prompt_tokens[i]} prompt "
                    f"tokens in vLLM, expected {text_tokens} text + "
                    f"{num_kept_tokens(prep.num_visual, res.ratio)} visual"
                )
            res.kept_visual[i] = kept
            res.visual_per_layer[i] = float(kept)
            res.kv_tokens[i] = float(res.prompt_tokens[i])


def _order(r: ArmResult) -> tuple[int, int, float]:
    """Table order: unpruned first, then trio arms by depth, then baselines; ratio desc."""
    names = [
        "stock-vllm",
        "hf-unpruned",
        "trio-vllm",
        "trio-layer",
        "trio-ref",
        "trio-ref-matched",
        "trio-ref-multi",
        "trio-hf",
        "trio+ve",
    ]
    base = r.arm.split("@")[0]
    rank = names.index(base) if base in names else len(names) + INPUT_BASELINES.index(base)
    return rank * 100 + (r.depth or 0), 0, -r.ratio


if __name__ == "__main__":
    raise SystemExit(main())
