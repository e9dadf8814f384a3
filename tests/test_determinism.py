"""The same request twice selects the same visual tokens and, greedy, gives the same text.

In-process engine (``trio_llm_nocache``), selections read from the model's
``trio_selection_log`` through ``LLM.apply_model``. The second run must not be
served from a cache (then the check would be empty): it uses a keep ratio one
float step below the first, which keeps the same number of tokens k (so the
same selection is expected) but changes the multimodal hash, so the processor
and encoder caches miss and the side pass runs again from scratch. A record
count per prompt proves that it did.
"""

from __future__ import annotations

import math

import pytest
from conftest import chat_prompt, make_image
from vllm import SamplingParams

from vllm_trio.core.budget import num_kept_tokens

pytestmark = pytest.mark.engine
GREEDY = SamplingParams(temperature=0, max_tokens=8)


def _records(llm, prompt_ids: list[int]) -> list:
    [log] = llm.apply_model(lambda model: list(model.trio_selection_log))
    return [r for r in log if list(r.prompt_ids) == prompt_ids]


def _request(question: str, images: list, ratio: float) -> dict:
    return {
        "prompt": chat_prompt(question, len(images)),
        "multi_modal_data": {"image": images if len(images) > 1 else images[0]},
        "mm_processor_kwargs": {"trio_keep_ratio": ratio},
    }


@pytest.mark.parametrize("ratio", [0.5, 0.111])
def test_same_request_twice_same_selection_and_text(trio_llm_nocache, ratio: float) -> None:
    images = [make_image(90), make_image(91, (168, 56))]
    question = "which shape is closest to the centre?"
    ids = trio_llm_nocache.get_tokenizer().encode(chat_prompt(question, 2))
    twin = math.nextafter(ratio, 0.0)
    assert all(num_kept_tokens(n, twin) == num_kept_tokens(n, ratio) for n in range(1, 4096))

    runs = []
    for r in (ratio, twin):
        before = len(_records(trio_llm_nocache, ids))
        [out] = trio_llm_nocache.generate([_request(question, images, r)], GREEDY, use_tqdm=False)
        recs = _records(trio_llm_nocache, ids)
        assert len(recs) == before + 2, "each image must run its own side pass again"
        runs.append((out, {rec.ordinal: rec.keep for rec in recs[-2:]}))

    (out_a, keep_a), (out_b, keep_b) = runs
    assert keep_a == keep_b
    assert set(keep_a) == {0, 1}
    assert out_a.prompt_token_ids == out_b.prompt_token_ids
    assert out_a.outputs[0].token_ids == out_b.outputs[0].token_ids
    assert out_a.outputs[0].text == out_b.outputs[0].text


def test_identical_request_repeated_gives_identical_text(trio_llm) -> None:
    """The exact same request (same hash: caches may serve it) three times over."""
    req = _request("what is at the bottom?", [make_image(92)], 0.222)
    outs = [trio_llm.generate([req], GREEDY, use_tqdm=False)[0] for _ in range(3)]
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1
    assert len({tuple(o.prompt_token_ids) for o in outs}) == 1
