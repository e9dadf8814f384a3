"""The TRIO processor inside vLLM's multimodal pipeline (no engine)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_image

import vllm_trio
from vllm_trio.core.budget import num_kept_tokens


def _processor(ckpt: Path, trio: bool, keep_ratio: float = 0.25, mode: str = "input"):
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from vllm_trio.plugin import register

    register()
    kwargs = vllm_trio.engine_kwargs(keep_ratio=keep_ratio, depth=1, mode=mode) if trio else {}
    model_config = ModelConfig(model=str(ckpt), max_model_len=2048, **kwargs)
    return MULTIMODAL_REGISTRY.create_processor(model_config)


@pytest.fixture(scope="module")
def trio_proc(tiny_ckpt: Path):
    return _processor(tiny_ckpt, trio=True)


@pytest.fixture(scope="module")
def stock_proc(tiny_ckpt: Path):
    return _processor(tiny_ckpt, trio=False)


def _run(proc, question: str, images: list, **mm_kwargs):
    from vllm.multimodal.processing.inputs import ProcessorInputs
    from vllm.multimodal.processing.processor import TimingContext

    tok = proc.info.get_tokenizer()
    prompt = tok.encode("USER: " + "<image>\n" * len(images) + question + " ASSISTANT:")
    items = proc.info.parse_mm_data({"image": images if len(images) > 1 else images[0]})
    return proc.apply(
        ProcessorInputs(prompt, items, hf_processor_mm_kwargs=mm_kwargs),
        TimingContext(enabled=False),
    )


def _num_image_tokens(out, image_token_id: int) -> int:
    return sum(1 for t in out["prompt_token_ids"] if t == image_token_id)


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.333, 0.222, 0.111, 0.01])
@pytest.mark.parametrize("size", [(112, 112), (56, 56), (168, 56), (40, 97)])
def test_placeholders_are_k_of_n(trio_proc, stock_proc, ratio: float, size) -> None:
    image = make_image(1, size)
    image_token = trio_proc.info.get_hf_config().image_token_index
    stock = _run(stock_proc, "what is here?", [image])
    n = _num_image_tokens(stock, image_token)
    out = _run(trio_proc, "what is here?", [image], trio_keep_ratio=ratio)
    assert _num_image_tokens(out, image_token) == num_kept_tokens(n, ratio)
    [placeholder] = out["mm_placeholders"]["image"]
    assert placeholder.length == num_kept_tokens(n, ratio)
    # Text around the image is untouched.
    strip = [t for t in out["prompt_token_ids"] if t != image_token]
    assert strip == [t for t in stock["prompt_token_ids"] if t != image_token]


def test_ratio_one_is_stock_token_for_token(trio_proc, stock_proc) -> None:
    images = [make_image(2), make_image(3, (168, 56))]
    stock = _run(stock_proc, "compare", images)
    trio = _run(trio_proc, "compare", images, trio_keep_ratio=1.0)
    assert trio["prompt_token_ids"] == stock["prompt_token_ids"]
    assert trio["mm_placeholders"] == stock["mm_placeholders"]


def test_server_default_ratio_applies(tiny_ckpt: Path) -> None:
    proc = _processor(tiny_ckpt, trio=True, keep_ratio=0.5)
    image_token = proc.info.get_hf_config().image_token_index
    out = _run(proc, "q", [make_image(4)])
    n = proc.info.get_num_image_tokens(image_width=112, image_height=112)
    assert _num_image_tokens(out, image_token) == num_kept_tokens(n, 0.5)


def test_hash_covers_text_ratio_and_position(trio_proc) -> None:
    image = make_image(5)

    def h(question: str, ratio: float) -> str:
        return _run(trio_proc, question, [image], trio_keep_ratio=ratio)["mm_hashes"]["image"][0]

    assert h("what colour?", 0.25) == h("what colour?", 0.25)
    assert h("what colour?", 0.25) != h("how many?", 0.25)
    assert h("what colour?", 0.25) != h("what colour?", 0.5)
    # The same image twice in one prompt: two items, two selections.
    two = _run(trio_proc, "same?", [image, image], trio_keep_ratio=0.25)["mm_hashes"]["image"]
    assert two[0] != two[1]


def test_items_carry_prompt_and_ordinal(trio_proc) -> None:
    images = [make_image(6), make_image(7)]
    out = _run(trio_proc, "two", images, trio_keep_ratio=0.25)
    items = out["mm_kwargs"]["image"]
    assert [int(it["trio_ordinal"].data) for it in items] == [0, 1]
    tok = trio_proc.info.get_tokenizer()
    expected = tok.encode("USER: <image>\n<image>\ntwo ASSISTANT:")
    for it in items:
        assert it["trio_prompt_ids"].data.tolist() == expected


@pytest.mark.parametrize("bad", [0, 1.5, float("nan"), "0.5", None])
def test_bad_ratio_names_the_kwarg(trio_proc, bad) -> None:
    with pytest.raises(ValueError, match="trio_keep_ratio"):
        _run(trio_proc, "q", [make_image(8)], trio_keep_ratio=bad)
