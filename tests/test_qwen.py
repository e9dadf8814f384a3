"""TRIO on Qwen2.5-VL: the real vLLM CPU engine and ``vllm serve`` on a locally built checkpoint.

Checked against HF transformers on the same weights: the selection (HF's
layers and M-RoPE vs the pure-PyTorch module vs vLLM), and the first-token
log-probabilities of the pruned prompt (HF given the same kept rows and the
3-row positions of the unpruned prompt), also with chunked prefill splitting
the image and after a prefix-cache hit that covers it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import assert_batched_equals_alone, make_image
from openai import BadRequestError, OpenAI
from vllm import SamplingParams

from trio_dev.accounting import measure_prompt_kv
from trio_dev.local_server import image_chat_messages, vllm_server
from trio_dev.qwen_checkpoints import IMAGE_PAD, SPECIAL_TOKENS
from trio_dev.qwen_reference import (
    core_fns_qwen,
    hidden_entering,
    pruned_logits_hf,
    qwen_prompt,
    select_hf,
)
from vllm_trio.core import TrioParams, num_kept_tokens, select_visual_tokens

pytestmark = pytest.mark.engine
DEPTH = 1
GREEDY = SamplingParams(temperature=0, max_tokens=6)
FIRST = SamplingParams(temperature=0, max_tokens=1, logprobs=20)
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
ENGINE = dict(
    max_model_len=2048,
    enforce_eager=True,
    kv_cache_memory_bytes=64 << 20,
    limit_mm_per_prompt={"image": 2, "video": 1},
    seed=0,
    dtype="float32",
    # Small blocks: prompts here are ~40-100 tokens; prefix caching shares full blocks only.
    block_size=32,
)
#: (width, height): wide, tall and square (merged grids h x w 4x12, 12x4, 8x8).
SIZES = [(336, 112), (112, 336), (224, 224)]


def prompt(question: str, num_images: int = 1) -> str:
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        + IMAGE * num_images
        + question
        + "<|im_end|>\n<|im_start|>assistant\n"
    )


def video_request(question: str, image=None, ratio: float | None = None) -> dict:
    """A 4-frame video (after an image, if given): videos are never pruned."""
    frames = torch.randint(0, 255, (4, 112, 112, 3), generator=torch.Generator().manual_seed(0))
    meta = {
        "total_num_frames": 4, "fps": 2.0, "duration": 2.0, "frames_indices": [0, 1, 2, 3],
        "video_backend": "opencv", "width": 112, "height": 112, "do_sample_frames": False,
    }  # fmt: skip
    video = "<|vision_start|><|video_pad|><|vision_end|>"
    req = request(question, [] if image is None else [image], ratio)
    req["prompt"] = req["prompt"].replace(question, video + question)
    req.setdefault("multi_modal_data", {})["video"] = (frames.numpy().astype("uint8"), meta)
    return req


def request(question: str, images: list, ratio: float | None = None) -> dict:
    req: dict = {"prompt": prompt(question, len(images))}
    if images:
        req["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
    if ratio is not None:
        req["mm_processor_kwargs"] = {"trio_keep_ratio": ratio}
    return req


def _trio(ckpt: Path, **kwargs):
    from vllm import LLM

    import vllm_trio

    return LLM(
        model=str(ckpt), **ENGINE, **kwargs, **vllm_trio.engine_kwargs(keep_ratio=0.25, depth=DEPTH)
    )


@pytest.fixture(scope="session")  # in-process: kept alive (see conftest)
def qwen_trio(qwen_ckpt):
    """Prefix caching on, chunked prefill in 32-token steps (images are split)."""
    return _trio(qwen_ckpt, enable_prefix_caching=True, max_num_batched_tokens=32)


@pytest.fixture(scope="session")  # in-process: kept alive (see conftest)
def qwen_alone(qwen_ckpt):
    """Every cache off, no chunking: the 'alone' baseline."""
    return _trio(
        qwen_ckpt, enable_prefix_caching=False, mm_processor_cache_gb=0, max_num_batched_tokens=2048
    )


@pytest.fixture(scope="session")  # in-process: kept alive (see conftest)
def qwen_stock(qwen_ckpt):
    from vllm import LLM

    return LLM(model=str(qwen_ckpt), enable_prefix_caching=False, **ENGINE)


@pytest.fixture(scope="module")
def hf(qwen_ckpt):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen_ckpt, dtype=torch.float32)
    return model.eval(), AutoProcessor.from_pretrained(qwen_ckpt)


def selection(llm, text: str, ordinal: int = 0) -> list[int]:
    ids = llm.get_tokenizer().encode(text)
    [log] = llm.apply_model(lambda model: list(model.trio_selection_log))
    for rec in reversed(log):
        if list(rec.prompt_ids) == ids and rec.ordinal == ordinal:
            return rec.keep
    raise AssertionError("no selection recorded for this prompt")


def max_logprob_diff(out, hf_logits: torch.Tensor) -> float:
    """Largest gap between vLLM's top-20 first-token log-probs and HF's at the same ids."""
    want = torch.log_softmax(hf_logits.float(), dim=-1)
    [first] = out.outputs[0].logprobs
    return max(abs(lp.logprob - float(want[tok])) for tok, lp in first.items())


@pytest.mark.parametrize("size", SIZES, ids=["wide", "tall", "square"])
def test_selection_and_logits_equal_hf(qwen_alone, hf, size) -> None:
    model, processor = hf
    image, question, ratio = make_image(40, size), "which shape is red?", 0.25
    [out] = qwen_alone.generate([request(question, [image], ratio)], FIRST, use_tqdm=False)
    keep = selection(qwen_alone, prompt(question))

    p = qwen_prompt(model, processor, prompt(question), image)
    n = p.visual_rows.numel()
    k = num_kept_tokens(n, ratio)
    assert len(keep) == k and len(out.prompt_token_ids) == p.input_ids.numel() - n + k
    # The pure-PyTorch module over HF's weights and hidden states ...
    hidden = hidden_entering(model, p, DEPTH)
    core = select_visual_tokens(
        hidden, p.visual_rows, k, *core_fns_qwen(model, DEPTH, p.positions), TrioParams()
    )
    assert core.keep.tolist() == keep
    # ... and HF's own layer computing the proxy loss pick the same tokens.
    assert select_hf(model, p, DEPTH, k).tolist() == keep
    # The pruned prompt's first token: HF on the same rows with 3-row positions.
    diff = max_logprob_diff(out, pruned_logits_hf(model, p, torch.tensor(keep)))
    print(f"max |logprob vLLM - HF| {size}: {diff:.2e}")
    assert diff < 1e-4


def test_ratio_one_equals_stock_vllm(qwen_alone, qwen_stock) -> None:
    reqs = [
        request("describe", [make_image(41, (112, 336))], 1.0),
        request("compare", [make_image(42), make_image(43, (336, 112))], 1.0),
        video_request("what happens?"),  # TRIO leaves videos as stock
    ]
    trio = qwen_alone.generate(reqs, GREEDY, use_tqdm=False)
    stock = qwen_stock.generate(
        [{k: v for k, v in r.items() if k != "mm_processor_kwargs"} for r in reqs],
        GREEDY,
        use_tqdm=False,
    )
    for a, b in zip(trio, stock, strict=True):
        assert a.prompt_token_ids == b.prompt_token_ids
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_kv_blocks_shrink_with_the_prompt(qwen_alone) -> None:
    image = make_image(44, (224, 224))  # 64 visual tokens
    measured = {
        r: measure_prompt_kv(qwen_alone, request("how many circles?", [image], r), f"kv-{r}")
        for r in (1.0, 0.333, 0.111)
    }
    text = measured[1.0].prompt_tokens - 64
    for r, m in measured.items():
        print(f"r={r}: {m.prompt_tokens} prompt tokens, {m.kv_blocks} KV blocks of {m.block_size}")
        assert m.prompt_tokens == text + num_kept_tokens(64, r)
        assert m.kv_blocks == -(-m.prompt_tokens // m.block_size)


def test_two_images_each_scored_alone_and_positions_exact(qwen_alone, hf) -> None:
    model, processor = hf
    images = [make_image(45, (336, 112)), make_image(46, (112, 336))]
    question = "which one has more blue?"
    [out] = qwen_alone.generate([request(question, images, 0.25)], FIRST, use_tqdm=False)
    first, second = (
        selection(qwen_alone, prompt(question, 2), 0),
        selection(qwen_alone, prompt(question, 2), 1),
    )
    assert len(first) == len(second) == num_kept_tokens(48, 0.25)
    # HF on the same kept rows of both images, with the unpruned prompt's positions.
    enc_p = qwen_prompt(model, processor, prompt(question, 2), images)
    keep = torch.tensor(first + [48 + i for i in second])
    diff = max_logprob_diff(out, pruned_logits_hf(model, enc_p, keep))
    print(f"max |logprob vLLM - HF| two images: {diff:.2e}")
    assert diff < 1e-4


def test_chunked_prefill_and_prefix_caching(qwen_trio, qwen_alone, hf) -> None:
    """32-token steps split each image; the same image under two questions keeps two
    selections; an identical rerun (a prefix-cache hit over the image, where vLLM
    recomputes no positions) gives the same first-token log-probs as HF."""
    model, processor = hf
    image = make_image(47, (112, 336))
    # Questions long enough that the cached full blocks of a rerun cover the image.
    tail = " Answer with one word, then describe every shape in the image in detail."
    qa, qb = "what colour is the square?" + tail, "is there a circle on the left?" + tail
    runs = [
        qwen_trio.generate([request(q, [image], 0.333)], FIRST, use_tqdm=False)[0]
        for q in (qa, qb, qa, qb)
    ]
    alone = [
        qwen_alone.generate([request(q, [image], 0.333)], FIRST, use_tqdm=False)[0]
        for q in (qa, qb)
    ]
    sel_a, sel_b = selection(qwen_alone, prompt(qa)), selection(qwen_alone, prompt(qb))
    assert sel_a != sel_b
    assert selection(qwen_trio, prompt(qa)) == sel_a
    assert selection(qwen_trio, prompt(qb)) == sel_b
    # The rerun's cache hit covers the image (vLLM then recomputes no positions).
    image_at = runs[2].prompt_token_ids.index(SPECIAL_TOKENS.index(IMAGE_PAD))
    assert runs[2].num_cached_tokens >= image_at + len(sel_a)
    for q, sel, got in ((qa, sel_a, runs[0]), (qb, sel_b, runs[1]), (qa, sel_a, runs[2])):
        p = qwen_prompt(model, processor, prompt(q), image)
        assert max_logprob_diff(got, pruned_logits_hf(model, p, torch.tensor(sel))) < 1e-4
    for got, want in zip(runs, alone + alone, strict=True):
        assert got.prompt_token_ids == want.prompt_token_ids
        assert got.outputs[0].token_ids == want.outputs[0].token_ids


def test_mixed_batch_equals_each_request_alone(qwen_trio, qwen_alone) -> None:
    tall, wide, square = make_image(48, (336, 112)), make_image(49, (112, 336)), make_image(50)
    reqs = [
        request("what is at the top?", [tall], 0.111),
        request("what is at the top?", [tall], 0.5),
        request("tell me a story about a red circle", []),
        request("which image is brighter?", [wide, square], 0.222),
        request("count the squares", [square]),  # server default ratio
        request("describe", [wide], 1.0),
        video_request("what moves?", tall, 0.25),  # a pruned image, then a stock video
    ]
    batch = qwen_trio.generate(reqs, GREEDY, use_tqdm=False)
    for req, got in zip(reqs, batch, strict=True):
        [want] = qwen_alone.generate([req], GREEDY, use_tqdm=False)
        assert got.prompt_token_ids == want.prompt_token_ids
        assert got.outputs[0].token_ids == want.outputs[0].token_ids


def test_images_encoded_in_one_step_select_as_one_at_a_time(qwen_alone) -> None:
    """One batched side pass over images of different grids (each its own M-RoPE
    table) selects and answers as each image alone."""
    tall, wide, square = make_image(51, (336, 112)), make_image(52, (112, 336)), make_image(53)
    reqs = [
        request("what is at the top?", [tall], 0.111),
        request("which image is brighter?", [wide, square], 0.222),
        request("count the squares", [square], 0.5),
        request("where is the red one?", [wide], 0.25),
    ]
    assert_batched_equals_alone(qwen_alone, reqs, GREEDY, images=5, batch_size=5)


@pytest.fixture(scope="module")
def qwen_client(qwen_ckpt, tmp_path_factory) -> Iterator[OpenAI]:
    log = tmp_path_factory.mktemp("logs") / "qwen_server.log"
    args = ["--plugin", "trio", "--trio-keep-ratio", "0.25", "--trio-depth", str(DEPTH)]
    with vllm_server(qwen_ckpt, args, log, timeout_s=480) as url:
        yield OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_server_per_request_ratio_and_400(qwen_client: OpenAI) -> None:
    model = qwen_client.models.list().data[0].id
    msgs = image_chat_messages("what colour is the circle?", [make_image(51, (224, 224))])

    def chat(ratio):
        extra = {} if ratio is None else {"vllm_xargs": {"keep_ratio": ratio}}
        return qwen_client.chat.completions.create(
            model=model, messages=msgs, max_tokens=4, temperature=0, extra_body=extra
        )

    full = chat(1.0).usage.prompt_tokens
    for r in (0.333, 0.111, None):
        want = full - 64 + num_kept_tokens(64, 0.25 if r is None else r)
        assert chat(r).usage.prompt_tokens == want
    with pytest.raises(BadRequestError) as err:
        chat(1.5)
    assert "vllm_xargs.keep_ratio" in str(err.value)
    assert chat(0.111).choices[0].message.content == chat(0.111).choices[0].message.content


@pytest.fixture(scope="module")
def qwen_tp2(qwen_ckpt):
    """Two tensor-parallel CPU workers, engine core in its own process (as ``test_scaleout``)."""
    from test_scaleout import environment
    from vllm import LLM

    import vllm_trio
    from trio_dev.local_server import cpu_worker_env

    env = {
        **cpu_worker_env(2),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
        "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    }
    with environment(env):
        llm = LLM(
            model=str(qwen_ckpt),
            tensor_parallel_size=2,
            distributed_executor_backend="mp",
            enable_prefix_caching=False,
            mm_processor_cache_gb=0,
            max_num_batched_tokens=2048,
            **ENGINE,
            **vllm_trio.engine_kwargs(keep_ratio=0.25, depth=DEPTH),
        )
        yield llm
        llm.llm_engine.engine_core.shutdown()


def test_tp2_selects_and_answers_as_tp1(qwen_tp2, qwen_alone) -> None:
    from vllm_trio.binding.trio_model import selection_log

    reqs = [
        request("tp: what is left?", [make_image(60, (336, 112))], 0.25),
        request("tp: compare", [make_image(61), make_image(62, (112, 336))], 0.2),
    ]
    two = qwen_tp2.generate(reqs, GREEDY, use_tqdm=False)
    one = qwen_alone.generate(reqs, GREEDY, use_tqdm=False)
    for a, b in zip(one, two, strict=True):
        assert a.prompt_token_ids == b.prompt_token_ids
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    logs = qwen_tp2.apply_model(selection_log)
    assert len(logs) == 2  # the side pass ran on both ranks
    for req in reqs:
        for ordinal in range(req["prompt"].count(IMAGE)):
            want = selection(qwen_alone, req["prompt"], ordinal)
            ids = qwen_alone.get_tokenizer().encode(req["prompt"])
            for log in logs:
                got = [r.keep for r in log if list(r.prompt_ids) == ids and r.ordinal == ordinal]
                assert got == [want]
