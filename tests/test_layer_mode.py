"""Layer mode (``--trio-mode layer``): the paper's in-LLM pruning at layer L inside vLLM.

One layer-mode engine, in vLLM's default compiled mode (no ``enforce_eager``:
on the CPU build that is one Dynamo trace compiled by Inductor), with prefix
caching and 32-token prefill chunks, so images and the text after them are
split across steps, and one with two tensor-parallel workers (eager). Their
first-token log-probabilities are compared over the whole vocabulary with the
HF reference that prunes inside the LLM at layer L
(``trio_dev.reference.prune_forward_hf``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ENGINE_KWARGS, TEST_DEPTH, assert_batched_equals_alone, chat_prompt, make_image
from hf_helpers import hf_prompt, load_hf
from vllm import SamplingParams

import vllm_trio
from trio_dev.reference import prune_forward_hf
from vllm_trio.binding.layer_mode import handover_update, num_text_rows
from vllm_trio.core import Schedule, num_kept_tokens

#: Float32 end to end; vLLM's CPU kernels and HF's differ in summation order only.
ATOL = 2e-4
#: Text before the image long enough that a 32-token chunk boundary falls inside it.
PREAMBLE = "here is a picture of a small red circle next to a big blue square, look closely"
FIRST = SamplingParams(temperature=0, max_tokens=1, logprobs=-1)
GREEDY = SamplingParams(temperature=0, max_tokens=6)


@pytest.fixture(scope="session")  # in-process: kept alive (see conftest)
def layer_llm(tiny_ckpt: Path):
    from vllm import LLM

    kwargs = {**ENGINE_KWARGS, "enforce_eager": False}
    return LLM(
        model=str(tiny_ckpt),
        enable_prefix_caching=True,
        enable_chunked_prefill=True,
        max_num_batched_tokens=32,
        max_logprobs=-1,
        **kwargs,
        **vllm_trio.engine_kwargs(keep_ratio=0.25, depth=TEST_DEPTH, mode="layer"),
    )


@pytest.fixture(scope="module")
def hf(tiny_ckpt: Path):
    return load_hf(tiny_ckpt)


def _prompt(question: str, num_images: int = 1, preamble: str = "") -> str:
    if not preamble:
        return chat_prompt(question, num_images)
    return f"USER: {preamble} " + "<image>\n" * num_images + question + " ASSISTANT:"


def _request(prompt: str, images: list, ratio: float | None = None) -> dict:
    req: dict = {"prompt": prompt}
    if images:
        req["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
    if ratio is not None:
        req["mm_processor_kwargs"] = {"trio_keep_ratio": ratio}
    return req


def _first_logprobs(llm, req: dict) -> torch.Tensor:
    [out] = llm.generate([req], FIRST, use_tqdm=False)
    lp = out.outputs[0].logprobs[0]
    return torch.tensor([lp[i].logprob for i in range(len(lp))])


def _reference_logprobs(hf, prompt: str, image, ratio: float, depth: int) -> torch.Tensor:
    """The paper's pruning inside the LLM at ``depth`` (``depth=0``: at the input)."""
    model, processor = hf
    p = hf_prompt(model, processor, prompt, image)
    k = num_kept_tokens(p.visual_positions.numel(), ratio)
    ref = prune_forward_hf(
        model, p.input_ids, p.pixel_values, p.image_sizes, Schedule.single(depth, k)
    )
    return torch.log_softmax(ref.logits_last.float(), dim=-1)


@pytest.mark.engine
@pytest.mark.parametrize("ratio", [0.5, 0.111])
def test_first_token_equals_in_llm_reference_across_chunks(layer_llm, hf, ratio) -> None:
    image, prompt = make_image(11), _prompt("which shape is red?", preamble=PREAMBLE)
    got = _first_logprobs(layer_llm, _request(prompt, [image], ratio))
    want = _reference_logprobs(hf, prompt, image, ratio, TEST_DEPTH)
    assert (got - want).abs().max() < ATOL
    # The test can tell the modes apart: pruning at the input is far from it.
    at_input = _reference_logprobs(hf, prompt, image, ratio, 0)
    assert (at_input - want).abs().max() > 100 * ATOL


@pytest.mark.engine
def test_two_questions_on_one_image_never_share_a_handover(layer_llm, hf) -> None:
    image = make_image(16)
    prompts = [_prompt("what colour is the square?"), _prompt("is there a circle on the left?")]
    want = [_reference_logprobs(hf, p, image, 0.222, TEST_DEPTH) for p in prompts]
    for i in (0, 1, 0, 1):  # the repeats hit vLLM's prefix, encoder and processor caches
        got = _first_logprobs(layer_llm, _request(prompts[i], [image], 0.222))
        assert (got - want[i]).abs().max() < ATOL


@pytest.mark.engine
def test_mixed_batch_equals_each_request_alone(layer_llm) -> None:
    img1, img2, img3 = make_image(17), make_image(18, (168, 56)), make_image(19, (56, 56))
    reqs = [
        _request(_prompt("what is at the top?", preamble=PREAMBLE), [img1], 0.111),
        _request(_prompt("what is at the top?"), [img1], 0.5),
        _request(_prompt("tell me a story about a red circle"), []),
        _request(_prompt("which image is brighter?", 2), [img2, img3], 0.222),
        _request(_prompt("count the squares"), [img3]),  # server default ratio
        _request(_prompt("describe"), [img2], 1.0),
    ]
    batch = layer_llm.generate(reqs, GREEDY, use_tqdm=False)
    for req, got in zip(reqs, batch, strict=True):
        layer_llm.reset_prefix_cache()
        layer_llm.reset_mm_cache()
        [alone] = layer_llm.generate([req], GREEDY, use_tqdm=False)
        assert got.prompt_token_ids == alone.prompt_token_ids
        assert got.outputs[0].token_ids == alone.outputs[0].token_ids


@pytest.mark.engine
def test_batched_side_pass_hands_over_as_one_at_a_time(layer_llm) -> None:
    """Two images of one prompt start inside one 32-token step, so they are scored
    in one batched side pass; the states handed to layer L give the answer each
    image gets on the single-image path."""
    reqs = [
        _request(_prompt("which one has more blue?", 2), [make_image(29), make_image(30)], 0.25),
        _request(_prompt("compare them", 2), [make_image(31), make_image(32, (56, 56))], 0.222),
    ]
    assert_batched_equals_alone(layer_llm, reqs, GREEDY, images=4, batch_size=2)


@pytest.mark.engine
def test_two_images_hand_over_visual_rows_only(layer_llm, trio_llm_nocache) -> None:
    """Two images: each is scored without the other, so no text is handed over; the
    kept rows still are (the answer's log-probabilities move away from input mode)."""
    req = _request(_prompt("which one has more blue?", 2), [make_image(20), make_image(21)], 0.25)
    layer = _first_logprobs(layer_llm, req)
    top5 = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    [out] = trio_llm_nocache.generate([req], top5, use_tqdm=False)
    top = out.outputs[0].logprobs[0]
    diff = max(abs(layer[t] - lp.logprob) for t, lp in top.items())
    assert diff > 100 * ATOL
    [again] = layer_llm.generate([req], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    assert len(again.prompt_token_ids) == len(out.prompt_token_ids)  # same KV budget


@pytest.mark.engine
def test_ratio_one_equals_stock_vllm(layer_llm, stock_llm) -> None:
    reqs = [
        _request(_prompt("describe"), [make_image(13)], 1.0),
        _request(_prompt("compare", 2), [make_image(14), make_image(15, (168, 56))], 1.0),
    ]
    layer = layer_llm.generate(reqs, GREEDY, use_tqdm=False)
    stock = stock_llm.generate(
        [{k: v for k, v in r.items() if k != "mm_processor_kwargs"} for r in reqs],
        GREEDY,
        use_tqdm=False,
    )
    for a, b in zip(layer, stock, strict=True):
        assert a.prompt_token_ids == b.prompt_token_ids
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_text_rows_only_for_the_single_pruned_image() -> None:
    img = 4
    one = [1, 5, img, 6, 7, 8]
    assert num_text_rows(one, img, 88, 22, "layer", 1) == 3
    assert num_text_rows(one, img, 88, 22, "input", 1) == 0
    assert num_text_rows(one, img, 88, 22, "layer", 0) == 0  # depth 0 is input mode
    assert num_text_rows(one, img, 88, 88, "layer", 1) == 0  # nothing pruned
    assert num_text_rows([1, img, 6, img, 7], img, 88, 22, "layer", 1) == 0
    assert num_text_rows(one, img, 24, 22, "layer", 1) == 0  # item would outgrow N rows
    target, replacement = handover_update(img, torch.tensor(one), 2, 3)
    assert target == [img, 6, 7, 8] and replacement == [img, img, 6, 7, 8]
    assert handover_update(img, torch.tensor(one), 2, 0) == ([img], [img, img])


def test_processor_puts_the_text_in_the_range_and_the_mode_in_the_hash(tiny_ckpt) -> None:
    from test_processor import _processor, _run

    layer = _processor(tiny_ckpt, trio=True, mode="layer")
    inp = _processor(tiny_ckpt, trio=True)
    image = make_image(5)
    a = _run(layer, "what colour?", [image], trio_keep_ratio=0.25)
    b = _run(inp, "what colour?", [image], trio_keep_ratio=0.25)
    assert a["prompt_token_ids"] == b["prompt_token_ids"]
    [pa], [pb] = a["mm_placeholders"]["image"], b["mm_placeholders"]["image"]
    assert pa.offset == pb.offset
    assert pa.length == len(a["prompt_token_ids"]) - pa.offset  # k rows + all text after
    assert pb.length == num_kept_tokens(88, 0.25)
    assert a["mm_hashes"]["image"] != b["mm_hashes"]["image"]
    two = _run(layer, "same?", [image, image], trio_keep_ratio=0.25)
    assert [p.length for p in two["mm_placeholders"]["image"]] == [num_kept_tokens(88, 0.25)] * 2


def test_mode_from_the_command_line_and_offline() -> None:
    import argparse

    from vllm_trio.config import TrioConfig
    from vllm_trio.requests.cli import add_cli_args, trio_config_from_args

    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(["--plugin", "trio", "--trio-mode", "layer"])
    assert trio_config_from_args(args) == TrioConfig(mode="layer")
    assert trio_config_from_args(parser.parse_args(["--plugin", "trio"])).mode == "input"
    with pytest.raises(SystemExit):
        parser.parse_args(["--plugin", "trio", "--trio-mode", "lyer"])
    with pytest.raises(ValueError, match="need --plugin trio"):
        trio_config_from_args(parser.parse_args(["--trio-mode", "layer"]))
    overrides = vllm_trio.engine_kwargs(mode="layer")["hf_overrides"]
    assert overrides.trio.config_attributes()["trio_mode"] == "layer"
    with pytest.raises(ValueError, match="trio_mode"):
        TrioConfig(mode="inside")


def test_layer_mode_refuses_micro_batching() -> None:
    from types import SimpleNamespace

    from vllm_trio.config import TRIO_ARCH
    from vllm_trio.layout import check_layer_mode

    def config(mode: str, ubatching: bool, arch: str = TRIO_ARCH) -> SimpleNamespace:
        hf_config = SimpleNamespace(trio_mode=mode, architectures=[arch])
        return SimpleNamespace(
            model_config=SimpleNamespace(hf_config=hf_config),
            parallel_config=SimpleNamespace(use_ubatching=ubatching),
        )

    check_layer_mode(config("layer", False))
    check_layer_mode(config("input", True))
    with pytest.raises(ValueError, match="micro-batching"):
        check_layer_mode(config("layer", True))
    # Layer mode is LLaVA-NeXT's; other families are refused with the reason.
    check_layer_mode(config("input", False, "TrioQwen2_5_VLForConditionalGeneration"))
    with pytest.raises(ValueError, match="LLaVA-NeXT only"):
        check_layer_mode(config("layer", False, "TrioQwen2_5_VLForConditionalGeneration"))


@pytest.fixture(scope="module")
def layer_tp2_llm(tiny_ckpt: Path):
    """Layer mode on two tensor-parallel CPU workers (set up as ``test_scaleout.tp2_llm``)."""
    from test_scaleout import TP, environment
    from vllm import LLM

    from trio_dev.local_server import cpu_worker_env

    env = {**cpu_worker_env(TP), "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    with environment(env):
        llm = LLM(
            model=str(tiny_ckpt),
            tensor_parallel_size=TP,
            distributed_executor_backend="mp",
            enable_prefix_caching=False,
            max_num_batched_tokens=32,
            max_logprobs=-1,
            **ENGINE_KWARGS,
            **vllm_trio.engine_kwargs(keep_ratio=0.25, depth=TEST_DEPTH, mode="layer"),
        )
        yield llm
        llm.llm_engine.engine_core.shutdown()


@pytest.mark.engine
def test_tp2_first_token_equals_in_llm_reference(layer_tp2_llm, hf) -> None:
    """Every rank hands over rank 0's states (its own shards computed the same up to
    summation order); the result is the reference's, as at one worker."""
    image, prompt = make_image(12), _prompt("where is the circle?", preamble=PREAMBLE)
    got = _first_logprobs(layer_tp2_llm, _request(prompt, [image], 0.222))
    want = _reference_logprobs(hf, prompt, image, 0.222, TEST_DEPTH)
    assert (got - want).abs().max() < ATOL


@pytest.mark.engine
def test_vllm_serve_trio_mode_layer(tiny_ckpt: Path, layer_llm, trio_llm, tmp_path_factory) -> None:
    """``vllm serve --plugin trio --trio-mode layer``, as a user types it: a chat at
    ``keep_ratio`` 0.111 gets the pruned ``prompt_tokens`` and the first-token
    log-probabilities of the in-process layer-mode engine, not of input mode."""
    import requests

    from trio_dev.local_server import image_chat_messages, vllm_server

    image, question, ratio = make_image(23), "which shape is on the left?", 0.111
    messages = image_chat_messages(question, [image])
    log = tmp_path_factory.mktemp("logs") / "layer_server.log"
    args = ["--plugin", "trio", "--trio-mode", "layer", "--trio-depth", str(TEST_DEPTH)]
    with vllm_server(tiny_ckpt, args, log) as url:
        body = {
            "model": requests.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"],
            "messages": messages,
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 20,
            "return_tokens_as_token_ids": True,
            "vllm_xargs": {"keep_ratio": ratio},
        }
        reply = requests.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        reply = reply.json()
    top = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    served = {int(t["token"].removeprefix("token_id:")): t["logprob"] for t in top}

    def engine_first(llm, params: SamplingParams):
        [out] = llm.chat(
            messages, params, use_tqdm=False, mm_processor_kwargs={"trio_keep_ratio": ratio}
        )
        return out.outputs[0].logprobs[0], len(out.prompt_token_ids)

    layer, prompt_len = engine_first(layer_llm, FIRST)
    assert reply["usage"]["prompt_tokens"] == prompt_len  # the pruned prompt
    assert max(abs(lp - layer[i].logprob) for i, lp in served.items()) < ATOL
    # The modes are told apart: input mode's log-probabilities are far from these.
    at_input, _ = engine_first(trio_llm, SamplingParams(temperature=0, max_tokens=1, logprobs=20))
    common = served.keys() & at_input.keys()
    assert not common or max(abs(served[i] - at_input[i].logprob) for i in common) > 100 * ATOL
