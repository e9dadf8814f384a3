"""LLaVA-NeXT checkpoints on the other text backbones users serve.

llava-v1.6 ships on Vicuna (Llama-2, covered by every other test), Mistral-7B
and Yi-34B (Llama layers); community checkpoints use Llama-3-8B (GQA 4:1,
llama3 rope scaling) and Qwen2 (q/k/v bias). For each, a tiny locally built
checkpoint passes the same checks as the Vicuna one: vLLM's selection equals
the pure-PyTorch module over HF's weights and the HF reference pruning inside
the LLM, the pruned prompt has text + k tokens, and `vllm serve --plugin trio`
serves it with a per-request ratio and the same answer as the engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ENGINE_KWARGS, TEST_DEPTH, chat_prompt, make_image
from hf_helpers import hf_hidden_entering, hf_prompt, load_hf
from openai import BadRequestError, OpenAI
from vllm import SamplingParams

import vllm_trio
from trio_dev.checkpoints import build_checkpoint
from trio_dev.hf_adapter import core_fns_from_hf
from trio_dev.local_server import image_chat_messages, vllm_server
from trio_dev.reference import prune_forward_hf
from vllm_trio.binding.model import selection_log
from vllm_trio.core import Schedule, TrioParams, num_kept_tokens, select_visual_tokens

pytestmark = pytest.mark.engine
BACKBONES = ("mistral", "llama3", "qwen2")
GREEDY = SamplingParams(temperature=0, max_tokens=6)
RATIO = 0.222


@pytest.fixture(scope="session", params=BACKBONES)
def backbone_ckpt(request, tmp_path_factory) -> tuple[str, Path]:
    preset = f"tiny-{request.param}"
    return request.param, build_checkpoint(tmp_path_factory.mktemp(preset), preset=preset)


@pytest.fixture(scope="session")  # in-process: kept alive (see conftest)
def backbone_llm(backbone_ckpt) -> Iterator:
    from vllm import LLM

    _, ckpt = backbone_ckpt
    llm = LLM(
        model=str(ckpt),
        enable_prefix_caching=False,
        max_num_batched_tokens=2048,
        **ENGINE_KWARGS,
        **vllm_trio.engine_kwargs(keep_ratio=0.25, depth=TEST_DEPTH),
    )
    yield llm


def test_backbone_is_the_one_built(backbone_ckpt, backbone_llm) -> None:
    backbone, _ = backbone_ckpt
    expected = {"mistral": "MistralForCausalLM", "llama3": "LlamaForCausalLM"}
    expected["qwen2"] = "Qwen2ForCausalLM"

    def text_model_class(model) -> tuple[str, bool]:
        layer = model.language_model.model.layers[0]
        return type(model.language_model).__name__, layer.self_attn.qkv_proj.bias is not None

    [(cls, has_bias)] = backbone_llm.apply_model(text_model_class)
    assert cls == expected[backbone]
    assert has_bias == (backbone == "qwen2")


def test_selection_equals_pure_pytorch_and_reference(backbone_ckpt, backbone_llm) -> None:
    _, ckpt = backbone_ckpt
    model, processor = load_hf(ckpt)
    image, text = make_image(41), chat_prompt("which shape is red?")
    req = {
        "prompt": text,
        "multi_modal_data": {"image": image},
        "mm_processor_kwargs": {"trio_keep_ratio": RATIO},
    }
    [out] = backbone_llm.generate([req], GREEDY, use_tqdm=False)
    [log] = backbone_llm.apply_model(selection_log)
    vllm_keep = log[-1].keep

    p = hf_prompt(model, processor, text, image)
    n = p.visual_positions.numel()
    k = num_kept_tokens(n, RATIO)
    assert len(vllm_keep) == k
    assert len(out.prompt_token_ids) == p.input_ids.numel() - n + k
    hidden = hf_hidden_entering(model, p, TEST_DEPTH)
    sel = select_visual_tokens(
        hidden,
        p.visual_positions,
        k,
        *core_fns_from_hf(model, TEST_DEPTH, hidden.shape[0]),
        params=TrioParams(),
    )
    assert sel.keep.tolist() == vllm_keep
    ref = prune_forward_hf(
        model, p.input_ids, p.pixel_values, p.image_sizes, Schedule.single(TEST_DEPTH, k)
    )
    assert ref.kept_positions[0].tolist() == vllm_keep


def test_served_with_a_per_request_ratio(backbone_ckpt, backbone_llm, tmp_path) -> None:
    _, ckpt = backbone_ckpt
    image, question = make_image(42), "what is at the top?"
    messages = image_chat_messages(question, [image])
    [engine_out] = backbone_llm.chat(
        messages, GREEDY, mm_processor_kwargs={"trio_keep_ratio": 0.111}, use_tqdm=False
    )
    args = ["--plugin", "trio", "--trio-depth", str(TEST_DEPTH)]
    with vllm_server(ckpt, args, tmp_path / "server.log") as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        model = client.models.list().data[0].id

        def chat(ratio: object):
            return client.chat.completions.create(
                model=model,
                messages=messages,
                max_tokens=GREEDY.max_tokens,
                temperature=0,
                extra_body={"vllm_xargs": {"keep_ratio": ratio}},
            )

        out = chat(0.111)
        assert out.usage.prompt_tokens == len(engine_out.prompt_token_ids)
        assert out.choices[0].message.content == engine_out.outputs[0].text
        with pytest.raises(BadRequestError, match=r"vllm_xargs\.keep_ratio"):
            chat(1.5)
