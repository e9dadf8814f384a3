"""The HF reference path on a tiny random LLaVA-NeXT built in the test.

Random weights prove plumbing only: the pruned forward reduces to HF's own
forward when nothing is dropped, drops and renumbers as the paper's code does,
and at layer 0 picks what the vLLM-side core (plain layer, query-only loss)
picks.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from hf_helpers import hf_hidden_entering
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
)

from trio_dev.hf_adapter import core_fns_from_hf
from trio_dev.reference import (
    ReferenceResult,
    build_inputs_embeds,
    generate_hf,
    loss_position_mask,
    prune_forward_hf,
)
from vllm_trio.core import (
    Schedule,
    TrioParams,
    select_visual_tokens,
)

IMAGE_TOKEN = 127
PINPOINTS = [[56, 112], [112, 56], [112, 112]]


@dataclass
class Prompt:
    input_ids: torch.Tensor  # [S]
    pixel_values: torch.Tensor
    image_sizes: torch.Tensor

    @property
    def num_visual(self) -> int:
        return int((self.input_ids == IMAGE_TOKEN).sum())


@pytest.fixture(scope="module")
def model() -> LlavaNextForConditionalGeneration:
    torch.manual_seed(0)
    text = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    vision = CLIPVisionConfig(
        image_size=56,
        patch_size=14,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=32,
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_grid_pinpoints=PINPOINTS,
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    # Larger-than-default weights make the random LM's logits less flat, so
    # saliencies and argmaxes are well separated.
    with torch.no_grad():
        for p in model.model.language_model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)
        model.lm_head.weight.normal_(0.0, 0.5)
    return model


def make_prompt(sizes: list[tuple[int, int]], seed: int = 0) -> Prompt:
    """Pixels through the real image processor; ``input_ids`` filled in later."""
    processor = LlavaNextImageProcessor(
        size={"shortest_edge": 56},
        crop_size={"height": 56, "width": 56},
        image_grid_pinpoints=PINPOINTS,
    )
    rng = np.random.default_rng(seed)
    images = [(rng.random((h, w, 3)) * 255).astype(np.uint8) for h, w in sizes]
    batch = processor(images=images, return_tensors="pt")
    return Prompt(torch.empty(0, dtype=torch.long), batch["pixel_values"], batch["image_sizes"])


@pytest.fixture(scope="module")
def prompt(model: LlavaNextForConditionalGeneration) -> Prompt:
    """``<s> text <image x N> text``, one anyres image (base, 2x2 tiles, newlines)."""
    p = make_prompt([(90, 100)])
    with torch.no_grad():
        feats = model.model.get_image_features(p.pixel_values, p.image_sizes, return_dict=True)
    n = sum(f.shape[0] for f in feats.pooler_output)
    text = torch.randint(3, IMAGE_TOKEN, (14,), generator=torch.Generator().manual_seed(1))
    p.input_ids = torch.cat([torch.tensor([1]), text[:5], torch.full((n,), IMAGE_TOKEN), text[5:]])
    return p


@pytest.fixture(scope="module")
def two_image_prompt(model: LlavaNextForConditionalGeneration) -> Prompt:
    p = make_prompt([(50, 100), (100, 40)], seed=3)
    with torch.no_grad():
        feats = model.model.get_image_features(p.pixel_values, p.image_sizes, return_dict=True)
    n1, n2 = (f.shape[0] for f in feats.pooler_output)
    p.input_ids = torch.cat(
        [
            torch.tensor([1, 10, 11]),
            torch.full((n1,), IMAGE_TOKEN),
            torch.tensor([12, 13]),
            torch.full((n2,), IMAGE_TOKEN),
            torch.tensor([14, 15, 16, 17, 18]),
        ]
    )
    return p


def hf_last_logits(model: LlavaNextForConditionalGeneration, p: Prompt) -> torch.Tensor:
    with torch.no_grad():
        out = model(
            input_ids=p.input_ids[None],
            pixel_values=p.pixel_values,
            image_sizes=p.image_sizes,
        )
    return out.logits[0, -1]


def run(
    model: LlavaNextForConditionalGeneration,
    p: Prompt,
    schedule: Schedule,
    **params: Any,
) -> ReferenceResult:
    return prune_forward_hf(
        model,
        p.input_ids,
        p.pixel_values,
        p.image_sizes,
        schedule,
        TrioParams(**params),
    )


def test_prompt_has_anyres_tokens(prompt: Prompt) -> None:
    # Base tile 4x4 = 16, plus the unpadded 8x8 grid of the 2x2 tiles with a
    # newline per row: well above one tile's 16.
    assert prompt.num_visual > 64


@pytest.mark.parametrize(
    "layers_keeps",
    [([0], None), ([1], None), ([0, 2], None), ([1, 3], None), ([2], 10_000)],
)
def test_keep_all_equals_unpruned_hf(
    model: LlavaNextForConditionalGeneration,
    prompt: Prompt,
    layers_keeps: tuple[list[int], int | None],
) -> None:
    layers, keep = layers_keeps
    n = prompt.num_visual
    schedule = Schedule.from_lists(layers, [keep or n] * len(layers))
    res = run(model, prompt, schedule)
    torch.testing.assert_close(res.logits_last, hf_last_logits(model, prompt), rtol=1e-5, atol=1e-5)
    assert all(k.tolist() == list(range(n)) for k in res.kept_positions)
    assert (
        res.visual_positions.tolist()
        == torch.nonzero(prompt.input_ids == IMAGE_TOKEN).flatten().tolist()
    )


def test_two_images_keep_all_equals_unpruned_hf(
    model: LlavaNextForConditionalGeneration, two_image_prompt: Prompt
) -> None:
    p = two_image_prompt
    res = run(model, p, Schedule.single(1, p.num_visual))
    torch.testing.assert_close(res.logits_last, hf_last_logits(model, p), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("layers", "keeps"), [([0], [17]), ([1, 3], [30, 9]), ([0, 1, 2], [40, 40, 5])]
)
def test_kept_sets(
    model: LlavaNextForConditionalGeneration,
    prompt: Prompt,
    layers: list[int],
    keeps: list[int],
) -> None:
    res = run(model, prompt, Schedule.from_lists(layers, keeps))
    entering = prompt.num_visual
    assert len(res.kept_positions) == len(layers)
    for kept, sal, k in zip(res.kept_positions, res.saliency, keeps, strict=True):
        assert kept.dtype == torch.int64
        assert kept.numel() == min(k, entering)
        assert torch.all(kept[1:] > kept[:-1])  # ascending, no repeats
        assert int(kept[0]) >= 0 and int(kept[-1]) < entering
        if k < entering:
            assert sal is not None and sal.shape == (entering,)
        else:
            assert sal is None
        entering = kept.numel()
    survivors = res.kept_visual_positions()
    assert survivors.numel() == keeps[-1]
    assert torch.all(prompt.input_ids[survivors] == IMAGE_TOKEN)


def test_two_images_pool(
    model: LlavaNextForConditionalGeneration, two_image_prompt: Prompt
) -> None:
    p = two_image_prompt
    res = run(model, p, Schedule.from_lists([1, 2], [20, 6]))
    vis = res.visual_positions
    assert vis.numel() == p.num_visual
    assert not torch.all(vis[1:] - vis[:-1] == 1)  # two separate runs of placeholders
    assert [k.numel() for k in res.kept_positions] == [20, 6]


@pytest.mark.parametrize("include_final", [False, True])
@pytest.mark.parametrize(("layer", "keep"), [(0, 24), (0, 5), (2, 24)])
def test_selection_matches_core(
    model: LlavaNextForConditionalGeneration,
    prompt: Prompt,
    layer: int,
    keep: int,
    include_final: bool,
) -> None:
    """The two implementations (HF all-rows vs core query-only) pick the same tokens."""
    params = TrioParams(include_final_position=include_final)
    res = prune_forward_hf(
        model,
        prompt.input_ids,
        prompt.pixel_values,
        prompt.image_sizes,
        Schedule.single(layer, keep),
        params,
    )
    if layer == 0:
        with torch.no_grad():
            hidden = build_inputs_embeds(
                model, prompt.input_ids, prompt.pixel_values, prompt.image_sizes
            )
    else:
        hidden = hf_hidden_entering(model, prompt, layer)
    sel = select_visual_tokens(
        hidden,
        res.visual_positions,
        keep,
        *core_fns_from_hf(model, layer, hidden.shape[0]),
        params=params,
    )
    assert res.saliency[0] is not None
    torch.testing.assert_close(sel.saliency, res.saliency[0], rtol=1e-4, atol=1e-7)
    assert sel.keep.tolist() == res.kept_positions[0].tolist()


def test_layer0_pruning_equals_hf_on_pruned_prompt(
    model: LlavaNextForConditionalGeneration, prompt: Prompt
) -> None:
    """At layer 0, pruning = HF's LM on the shortened prompt, positions 0..S'-1."""
    res = run(model, prompt, Schedule.single(0, 12))
    keep_rows = torch.ones(prompt.input_ids.numel(), dtype=torch.bool)
    keep_rows[res.visual_positions] = False
    keep_rows[res.kept_visual_positions()] = True
    with torch.no_grad():
        embeds = build_inputs_embeds(
            model, prompt.input_ids, prompt.pixel_values, prompt.image_sizes
        )
        out = model.model.language_model(inputs_embeds=embeds[keep_rows][None])
        want = model.lm_head(out.last_hidden_state[0, -1])
    torch.testing.assert_close(res.logits_last, want, rtol=1e-5, atol=1e-5)


def test_pruning_changes_logits_but_not_far(
    model: LlavaNextForConditionalGeneration, prompt: Prompt
) -> None:
    full = hf_last_logits(model, prompt)
    pruned = run(model, prompt, Schedule.single(2, 10)).logits_last
    assert not torch.allclose(full, pruned)
    assert torch.isfinite(pruned).all()


def test_loss_position_mask_matches_core_semantics() -> None:
    from vllm_trio.core import loss_positions

    for s in range(1, 15):
        for k in (1, 4, 20):
            for final in (False, True):
                got = torch.nonzero(loss_position_mask(s, k, final)).flatten().tolist()
                assert got == loss_positions(s, k, final).tolist(), (s, k, final)


def test_stage_beyond_last_layer_raises(
    model: LlavaNextForConditionalGeneration, prompt: Prompt
) -> None:
    with pytest.raises(ValueError, match="out of range"):
        run(model, prompt, Schedule.single(4, 10))


def test_inference_mode_caller(model: LlavaNextForConditionalGeneration, prompt: Prompt) -> None:
    schedule = Schedule.from_lists([1, 2], [20, 8])
    want = run(model, prompt, schedule)
    with torch.inference_mode():
        got = run(model, prompt, schedule)
    torch.testing.assert_close(got.logits_last, want.logits_last)
    assert [k.tolist() for k in got.kept_positions] == [k.tolist() for k in want.kept_positions]


def test_generate_keep_all_equals_hf_generate(
    model: LlavaNextForConditionalGeneration, prompt: Prompt
) -> None:
    n_new = 6
    ours = generate_hf(
        model,
        prompt.input_ids,
        prompt.pixel_values,
        prompt.image_sizes,
        Schedule.single(1, prompt.num_visual),
        max_new_tokens=n_new,
    )
    with torch.no_grad():
        out = model.generate(
            input_ids=prompt.input_ids[None],
            pixel_values=prompt.pixel_values,
            image_sizes=prompt.image_sizes,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
        )
    assert ours == out[0, prompt.input_ids.numel() :].tolist()


def test_generate_pruned(model: LlavaNextForConditionalGeneration, prompt: Prompt) -> None:
    schedule = Schedule.from_lists([1, 2], [20, 8])
    args = (model, prompt.input_ids, prompt.pixel_values, prompt.image_sizes, schedule)
    tokens = generate_hf(*args, max_new_tokens=5)
    assert len(tokens) == 5
    assert all(0 <= t < 128 for t in tokens)
    assert tokens[0] == int(run(model, prompt, schedule).logits_last.argmax())
    assert generate_hf(*args, max_new_tokens=5) == tokens
    assert generate_hf(*args, max_new_tokens=0) == []
    # Stops at (and includes) the end-of-sequence token.
    assert generate_hf(*args, max_new_tokens=5, eos_token_id=tokens[1]) == tokens[:2]


def test_reference_does_not_import_vllm() -> None:
    """The oracle must stay independent of the code it checks (and of vLLM)."""
    code = (
        "import sys, trio_dev.reference, vllm_trio.core\n"
        "bad = [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
