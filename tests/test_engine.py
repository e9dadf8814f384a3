"""The real vLLM CPU engine with TRIO on a locally built LLaVA-NeXT."""

from __future__ import annotations

import pytest
import torch
from conftest import TEST_DEPTH, assert_batched_equals_alone, chat_prompt, make_image
from hf_helpers import hf_hidden_entering, hf_prompt, load_hf
from vllm import SamplingParams

from trio_dev.accounting import measure_prompt_kv
from trio_dev.hf_adapter import core_fns_from_hf
from trio_dev.reference import prune_forward_hf
from vllm_trio.core import Schedule, TrioParams, num_kept_tokens, select_visual_tokens

pytestmark = pytest.mark.engine
GREEDY = SamplingParams(temperature=0, max_tokens=6)


def _request(question: str, images: list, ratio: float | None = None) -> dict:
    req: dict = {"prompt": chat_prompt(question, len(images))}
    if images:
        req["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
    if ratio is not None:
        req["mm_processor_kwargs"] = {"trio_keep_ratio": ratio}
    return req


def _selection_log(llm) -> list:
    [log] = llm.apply_model(lambda model: list(model.trio_selection_log))
    return log


def _selection_for(llm, prompt_ids: list[int], ordinal: int = 0) -> list[int]:
    for rec in reversed(_selection_log(llm)):
        if list(rec.prompt_ids) == prompt_ids and rec.ordinal == ordinal:
            return rec.keep
    raise AssertionError("no selection recorded for this prompt")


def _generate(llm, reqs: list[dict]):
    return llm.generate(reqs, GREEDY, use_tqdm=False)


@pytest.fixture(scope="module")
def hf(tiny_ckpt):
    return load_hf(tiny_ckpt)


@pytest.mark.parametrize("ratio", [0.5, 0.222, 0.111])
def test_selection_equals_pure_pytorch_and_reference(trio_llm_nocache, hf, ratio: float) -> None:
    model, processor = hf
    image, text = make_image(11), chat_prompt("which shape is red?")
    [out] = _generate(trio_llm_nocache, [_request("which shape is red?", [image], ratio)])
    tok = processor.tokenizer
    vllm_keep = _selection_for(trio_llm_nocache, tok.encode(text))

    p = hf_prompt(model, processor, text, image)
    n = p.visual_positions.numel()
    k = num_kept_tokens(n, ratio)
    assert len(vllm_keep) == k
    assert len(out.prompt_token_ids) == p.input_ids.numel() - n + k

    # Same selection from the pure-PyTorch module over HF's weights and hidden states.
    hidden = hf_hidden_entering(model, p, TEST_DEPTH)
    sel = select_visual_tokens(
        hidden,
        p.visual_positions,
        k,
        *core_fns_from_hf(model, TEST_DEPTH, hidden.shape[0]),
        params=TrioParams(),
    )
    assert sel.keep.tolist() == vllm_keep
    # ... and from the paper-faithful reference pruning inside the LLM at layer L.
    ref = prune_forward_hf(
        model,
        p.input_ids,
        p.pixel_values,
        p.image_sizes,
        Schedule.single(TEST_DEPTH, k),
    )
    assert ref.kept_positions[0].tolist() == vllm_keep


def test_kv_blocks_shrink_with_the_prompt(trio_llm_nocache) -> None:
    image = make_image(12)
    measured = {
        r: measure_prompt_kv(trio_llm_nocache, _request("how many circles?", [image], r), f"kv-{r}")
        for r in (1.0, 0.333, 0.222, 0.111)
    }
    full = measured[1.0]
    text_tokens = full.prompt_tokens - 88  # a 112x112 image is 88 visual tokens here
    for r, m in measured.items():
        assert m.prompt_tokens == text_tokens + num_kept_tokens(88, r)
        assert m.kv_blocks == -(-m.prompt_tokens // m.block_size)
    assert measured[0.111].prompt_tokens < measured[0.333].prompt_tokens < full.prompt_tokens


def test_ratio_one_equals_stock_vllm(trio_llm_nocache, stock_llm) -> None:
    reqs = [
        _request("describe", [make_image(13)], 1.0),
        _request("compare", [make_image(14), make_image(15, (168, 56))], 1.0),
    ]
    trio = _generate(trio_llm_nocache, reqs)
    stock = _generate(
        stock_llm,
        [{k: v for k, v in r.items() if k != "mm_processor_kwargs"} for r in reqs],
    )
    for a, b in zip(trio, stock, strict=True):
        assert a.prompt_token_ids == b.prompt_token_ids
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_same_image_two_questions_with_prefix_caching(trio_llm, trio_llm_nocache) -> None:
    image = make_image(16)
    qa = _request("what colour is the square?", [image], 0.222)
    qb = _request("is there a circle on the left?", [image], 0.222)
    cached = [_generate(trio_llm, [q])[0] for q in (qa, qb, qa, qb)]
    alone = [_generate(trio_llm_nocache, [q])[0] for q in (qa, qb)]
    tok = trio_llm.get_tokenizer()
    sel_a = _selection_for(trio_llm_nocache, tok.encode(qa["prompt"]))
    sel_b = _selection_for(trio_llm_nocache, tok.encode(qb["prompt"]))
    assert sel_a != sel_b  # the question changes the selection ...
    assert (
        _selection_for(trio_llm, tok.encode(qa["prompt"])) == sel_a
    )  # ... and caching keeps it apart
    assert _selection_for(trio_llm, tok.encode(qb["prompt"])) == sel_b
    for got, want in zip(cached, alone + alone, strict=True):
        assert got.prompt_token_ids == want.prompt_token_ids
        assert got.outputs[0].token_ids == want.outputs[0].token_ids


def test_concurrent_batch_equals_each_request_alone(trio_llm, trio_llm_nocache) -> None:
    img1, img2, img3 = (
        make_image(17),
        make_image(18, (168, 56)),
        make_image(19, (56, 56)),
    )
    reqs = [
        _request("what is at the top?", [img1], 0.111),
        _request("what is at the top?", [img1], 0.5),
        _request("tell me a story about a red circle", []),
        _request("which image is brighter?", [img2, img3], 0.222),
        _request("count the squares", [img3]),  # server default ratio
        _request("describe", [img2], 1.0),
    ]
    batch = _generate(trio_llm, reqs)  # chunked prefill: 96-token steps
    for req, got in zip(reqs, batch, strict=True):
        [want] = _generate(trio_llm_nocache, [req])
        assert got.prompt_token_ids == want.prompt_token_ids
        assert got.outputs[0].token_ids == want.outputs[0].token_ids


def test_images_encoded_in_one_step_select_as_one_at_a_time(trio_llm_nocache) -> None:
    """Concurrent requests: their images go through one batched side pass and get
    the selections (and answers) each gets alone on the single-image path."""
    reqs = [
        _request("what is at the top?", [make_image(23)], 0.111),
        _request("which shape is red?", [make_image(24, (168, 56))], 0.25),
        _request("compare the two", [make_image(25), make_image(26, (56, 56))], 0.222),
        _request("tell me about the colours", []),
        _request("count the squares", [make_image(27)], 0.5),
        _request("describe", [make_image(28)], 1.0),  # nothing to score
    ]
    assert_batched_equals_alone(trio_llm_nocache, reqs, GREEDY, images=5, batch_size=5)


def test_two_images_each_scored_in_its_own_context(trio_llm_nocache) -> None:
    img1, img2 = make_image(20), make_image(21)
    req = _request("which one has more blue?", [img1, img2], 0.25)
    [out] = _generate(trio_llm_nocache, [req])
    ids = trio_llm_nocache.get_tokenizer().encode(req["prompt"])
    first, second = (
        _selection_for(trio_llm_nocache, ids, 0),
        _selection_for(trio_llm_nocache, ids, 1),
    )
    assert len(first) == len(second) == num_kept_tokens(88, 0.25)
    assert len(out.prompt_token_ids) == len(ids) - 2 + 2 * num_kept_tokens(88, 0.25)


def test_side_pass_frees_its_graph(trio_llm_nocache) -> None:
    import gc

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    req = _request("where is the triangle?", [make_image(22)], 0.2)
    _generate(trio_llm_nocache, [req])
    before = live_tensors()
    for _ in range(3):
        _generate(trio_llm_nocache, [req])
    assert live_tensors() - before < 50
