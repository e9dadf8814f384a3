"""Qwen2.5-VL's M-RoPE positions under pruning, without an engine.

The positions the TRIO model gives vLLM's runner (``get_mrope_input_positions``
before any selection, then ``recompute_mrope_positions`` step by step) must
end up equal to HF's positions of the unpruned prompt at the kept rows, for
any chunking of the prefill, tall and wide images, and two images in one
prompt; and the runner patch must be inert for other models.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import make_image

from vllm_trio.binding.qwen2_5_vl import TrioQwen2_5_VLForConditionalGeneration as TrioQwen
from vllm_trio.core.mrope import image_in_text_positions

QUESTION = "<|im_start|>user\n{images}what is on the left?<|im_end|>\n<|im_start|>assistant\n"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def hf(qwen_ckpt):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen_ckpt, dtype=torch.float32)
    return model.eval(), AutoProcessor.from_pretrained(qwen_ckpt)


def _hf_positions(hf, images):
    model, processor = hf
    text = QUESTION.format(images=IMAGE * len(images))
    enc = processor(images=images, text=text, return_tensors="pt")
    pos, _ = model.model.get_rope_index(
        enc["input_ids"], enc.get("mm_token_type_ids"), enc["image_grid_thw"]
    )
    return enc["input_ids"][0], pos[:, 0], enc["image_grid_thw"]


@pytest.mark.parametrize("size", [(112, 336), (336, 112), (224, 224)])
def test_side_pass_positions_equal_hf(hf, size) -> None:
    ids, want, grid = _hf_positions(hf, [make_image(1, size)])
    image_rows = torch.nonzero(ids == hf[0].config.image_token_id).squeeze(1)
    _, h, w = (int(x) // 2 for x in grid[0])
    before = int(image_rows[0])
    got = image_in_text_positions(before, h, w, ids.numel() - before - h * w)
    assert torch.equal(got, want)


def _fake_model(config):
    """What the two position methods read of the model: its config and grid iterator."""
    fake = SimpleNamespace(config=config)
    fake.iter_mm_grid_thw = lambda feats: TrioQwen.iter_mm_grid_thw(fake, feats)
    return fake


def _feature(offset: int, length: int, grid_thw: torch.Tensor):
    return SimpleNamespace(
        modality="image",
        mm_position=SimpleNamespace(offset=offset, length=length),
        data={"image_grid_thw": SimpleNamespace(data=grid_thw)},
    )


@pytest.mark.parametrize("chunk", [7, 16, 1000])
@pytest.mark.parametrize("sizes", [[(112, 336)], [(336, 112), (224, 112)]])
def test_pruned_prompt_positions_equal_hf_at_the_kept_rows(hf, sizes, chunk) -> None:
    config = hf[0].config
    images = [make_image(2 + i, s) for i, s in enumerate(sizes)]
    ids, full, grids = _hf_positions(hf, images)
    is_image = ids == config.image_token_id
    # Keep every third visual token of each image (any selection works).
    gen = torch.Generator().manual_seed(0)
    runs, keeps, rows_kept = [], [], torch.ones(ids.numel(), dtype=torch.bool)
    starts = torch.nonzero(is_image & ~torch.roll(is_image, 1)).squeeze(1).tolist()
    for start, g in zip(starts, grids, strict=True):
        n = int(g.prod()) // 4
        keep = torch.sort(torch.randperm(n, generator=gen)[: max(1, n // 3)]).values
        rows_kept[start : start + n] = False
        rows_kept[start + keep] = True
        runs.append((start, n))
        keeps.append(keep)
    want = full[:, rows_kept]
    pruned_ids = ids[rows_kept]

    fake = _fake_model(config)
    pruned_starts = torch.nonzero(
        (pruned_ids == config.image_token_id) & ~torch.roll(pruned_ids == config.image_token_id, 1)
    ).squeeze(1)
    feats = [
        _feature(int(s), keep.numel(), g)
        for s, keep, g in zip(pruned_starts, keeps, grids, strict=True)
    ]
    positions, delta = TrioQwen.get_mrope_input_positions(fake, pruned_ids.tolist(), feats)
    text = pruned_ids != config.image_token_id
    assert torch.equal(positions[:, text], want[:, text])  # exact before any recompute
    assert delta == int(want.max()) + 1 - pruned_ids.numel()

    # Each item's rows as embed_multimodal returns them: features + (t, h, w, 1).
    rows = []
    for keep, g in zip(keeps, grids, strict=True):
        h, w = int(g[1]) // 2, int(g[2]) // 2
        grid = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"))
        grid = torch.cat([torch.zeros(1, h * w, dtype=torch.long), grid.reshape(2, -1)])[:, keep]
        rows.append(
            torch.cat(
                [torch.randn(keep.numel(), 8), grid.T.float(), torch.ones(keep.numel(), 1)], dim=1
            )
        )
    # Prefill in chunks of `chunk` tokens; each step passes the rows it covers.
    done = 0
    while done < pruned_ids.numel():
        end = min(done + chunk, pruned_ids.numel())
        step = []
        for f, r in zip(feats, rows, strict=True):
            lo, hi = (
                max(done - f.mm_position.offset, 0),
                min(end - f.mm_position.offset, r.shape[0]),
            )
            if lo < hi:
                step.append(r[lo:hi])
        stripped, positions, delta = TrioQwen.recompute_mrope_positions(
            fake, pruned_ids.tolist(), step, positions, done
        )
        assert [s.shape[1] for s in stripped] == [8] * len(step)
        done = end
    assert torch.equal(positions, want)
    assert delta == int(want.max()) + 1 - pruned_ids.numel()


def test_runner_patch_is_installed_and_inert_for_other_models() -> None:
    import vllm.v1.worker.cpu_model_runner as cpu
    import vllm.v1.worker.gpu.model_states.default as mrv2
    import vllm.v1.worker.gpu_model_runner as gpu

    from vllm_trio.patches import inventory
    from vllm_trio.patches.mm_pruning_runners import _wrap_load_model
    from vllm_trio.plugin import register

    register()
    names = {p.name for p in inventory()}
    assert {"mm_pruning_gpu_v1", "mm_pruning_cpu", "mm_pruning_mrv2"} <= names
    for load_model in (gpu.GPUModelRunner.load_model, cpu.CPUModelRunner.load_model):
        assert load_model._trio_wrapped
    assert mrv2.maybe_create_mm_pruner._trio_wrapped

    stock_config = SimpleNamespace(
        hf_config=SimpleNamespace(architectures=["Qwen2_5_VLForConditionalGeneration"])
    )
    trio_config = SimpleNamespace(
        hf_config=SimpleNamespace(architectures=["TrioQwen2_5_VLForConditionalGeneration"])
    )
    llava_trio = SimpleNamespace(
        hf_config=SimpleNamespace(architectures=["TrioLlavaNextForConditionalGeneration"])
    )
    wants = SimpleNamespace(is_multimodal_pruning_enabled=True)

    class Runner:  # the wrapper the patch puts on both V1 runners' load_model
        def load_model(self) -> None:
            pass

    _wrap_load_model(Runner)
    for config, model, expected in (
        (stock_config, wants, False),  # stock Qwen2.5-VL: untouched
        (llava_trio, SimpleNamespace(), False),  # TRIO LLaVA-NeXT: no M-RoPE, untouched
        (trio_config, wants, True),
    ):
        runner = Runner()
        runner.model_config, runner.uses_mrope = config, True
        runner.is_multimodal_pruning_enabled = False
        runner.get_model = lambda m=model: m
        runner.load_model()
        assert runner.is_multimodal_pruning_enabled is expected
    # Model Runner V2: no pruner for stock (no video pruning rate), one for TRIO.
    mm_config = SimpleNamespace(is_multimodal_pruning_enabled=lambda: False)
    for config, expected in ((stock_config, False), (trio_config, True)):
        config.multimodal_config = mm_config
        config.get_inputs_embeds_size = lambda: 128
        pruner = mrv2.maybe_create_mm_pruner(config, wants, object(), object())
        assert (pruner is not None) is expected


def test_video_pruning_rate_is_refused_with_trio() -> None:
    from vllm_trio.layout import check_video_pruning

    check_video_pruning(SimpleNamespace(video_pruning_rate=None))
    with pytest.raises(ValueError, match=r"--video-pruning-rate 0\.5 cannot be combined"):
        check_video_pruning(SimpleNamespace(video_pruning_rate=0.5))
