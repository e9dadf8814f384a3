"""The real OpenAI-compatible server on 127.0.0.1, driven by the ``openai`` client."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import requests
from conftest import make_image
from openai import BadRequestError, OpenAI

from trio_dev.local_server import image_chat_messages as image_messages
from trio_dev.local_server import metric_samples, vllm_server
from vllm_trio.core.budget import num_kept_tokens

pytestmark = pytest.mark.engine
N_112 = 88  # visual tokens of a 112x112 image on the tiny checkpoint


@pytest.fixture(scope="module")
def trio_url(tiny_ckpt, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("logs") / "trio_server.log"
    args = ["--plugin", "trio", "--trio-keep-ratio", "0.25", "--trio-depth", "1"]
    with vllm_server(tiny_ckpt, args, log) as url:
        yield url


@pytest.fixture(scope="module")
def client(trio_url: str) -> OpenAI:
    return OpenAI(base_url=f"{trio_url}/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client: OpenAI, messages: list[dict], keep_ratio: object = None, **kw):
    extra = {} if keep_ratio is None else {"vllm_xargs": {"keep_ratio": keep_ratio}}
    model = client.models.list().data[0].id
    return client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=4,
        temperature=0,
        extra_body=extra,
        **kw,
    )


def test_prompt_tokens_follow_the_ratio(client: OpenAI) -> None:
    msgs = image_messages("what colour is the circle?", [make_image(30)])
    full = chat(client, msgs, 1.0).usage.prompt_tokens
    text = full - N_112
    for r in (0.333, 0.222, 0.111):
        assert chat(client, msgs, r).usage.prompt_tokens == text + num_kept_tokens(N_112, r)
    # No per-request ratio: the server default (--trio-keep-ratio 0.25).
    assert chat(client, msgs).usage.prompt_tokens == text + num_kept_tokens(N_112, 0.25)


def test_same_request_same_answer(client: OpenAI) -> None:
    msgs = image_messages("where is the square?", [make_image(31)])
    a, b = chat(client, msgs, 0.2), chat(client, msgs, 0.2)
    assert a.choices[0].message.content == b.choices[0].message.content


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, "0.5", "abc"])
def test_invalid_ratio_is_400_naming_the_field(client: OpenAI, bad: object) -> None:
    msgs = image_messages("q", [make_image(32)])
    with pytest.raises(BadRequestError) as err:
        chat(client, msgs, bad)
    assert "vllm_xargs.keep_ratio" in str(err.value)
    # The engine keeps serving.
    assert chat(client, msgs, 0.5).usage.prompt_tokens > 0


@pytest.mark.parametrize("raw", ["NaN", "null", "Infinity"])
def test_invalid_json_values_are_400(trio_url: str, client: OpenAI, raw: str) -> None:
    model = client.models.list().data[0].id
    body = json.dumps(
        {
            "model": model,
            "max_tokens": 2,
            "messages": image_messages("q", [make_image(33)]),
        }
    )
    body = body[:-1] + f', "vllm_xargs": {{"keep_ratio": {raw}}}}}'
    resp = requests.post(
        f"{trio_url}/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert resp.status_code == 400, resp.text
    assert "keep_ratio" in resp.text


def test_completions_endpoint_accepts_and_validates(client: OpenAI) -> None:
    model = client.models.list().data[0].id
    out = client.completions.create(
        model=model,
        prompt="a red circle",
        max_tokens=3,
        extra_body={"vllm_xargs": {"keep_ratio": 0.5}},
    )
    assert out.usage.prompt_tokens > 0
    with pytest.raises(BadRequestError, match=r"vllm_xargs\.keep_ratio"):
        client.completions.create(
            model=model,
            prompt="x",
            max_tokens=3,
            extra_body={"vllm_xargs": {"keep_ratio": 2}},
        )


def test_mm_processor_kwargs_still_need_trust(trio_url: str, client: OpenAI) -> None:
    model = client.models.list().data[0].id
    out = requests.post(
        f"{trio_url}/v1/chat/completions",
        json={
            "model": model,
            "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}],
            "mm_processor_kwargs": {"num_crops": 4},
        },
        timeout=60,
    )
    assert out.status_code == 400 and "mm_processor_kwargs" in out.text


def test_two_images_and_text_only(client: OpenAI) -> None:
    two = chat(client, image_messages("compare", [make_image(34), make_image(35)]), 0.25)
    one = chat(client, image_messages("compare", [make_image(34)]), 0.25)
    assert two.usage.prompt_tokens - one.usage.prompt_tokens == num_kept_tokens(N_112, 0.25) + 1
    text = chat(client, [{"role": "user", "content": "hello"}], 0.25)
    assert text.usage.prompt_tokens > 0


def test_stock_server_ignores_trio(tiny_ckpt, tmp_path_factory, trio_url: str) -> None:
    """Installed but not switched on: stock LLaVA-NeXT, full prompt."""
    msgs = image_messages("what colour is the circle?", [make_image(30)])
    log = tmp_path_factory.mktemp("logs") / "stock_server.log"
    with vllm_server(tiny_ckpt, [], log) as url:
        stock = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        out = chat(stock, msgs, 0.111)
        trio_full = chat(
            OpenAI(base_url=f"{trio_url}/v1", api_key="unused", max_retries=0),
            msgs,
            1.0,
        )
        assert out.usage.prompt_tokens == trio_full.usage.prompt_tokens
        assert out.choices[0].message.content == trio_full.choices[0].message.content
    assert "TrioLlavaNext" not in log.read_text()


def test_lmms_eval_client_path(client: OpenAI) -> None:
    """The request shape lmms-eval's openai backend sends reaches TRIO (issue 3.5)."""
    from benchmarks.quality.lmms_eval_smoke import default_sample, lmms_style_chat

    image, question, _ = default_sample()
    model = client.models.list().data[0].id
    full = lmms_style_chat(client, model, image, question, max_tokens=4, keep_ratio=1.0)
    pruned = lmms_style_chat(client, model, image, question, max_tokens=4, keep_ratio=0.111)
    default = lmms_style_chat(client, model, image, question, max_tokens=4)
    assert full.choices[0].message.content is not None
    assert pruned.usage.prompt_tokens < default.usage.prompt_tokens < full.usage.prompt_tokens


def _trio_metrics(url: str) -> dict[tuple[str, str], float]:
    """``(sample name, stage label) -> value`` of TRIO's series on ``/metrics``."""
    text = requests.get(f"{url}/metrics", timeout=30).text
    return {
        (name, labels.get("stage", "") + labels.get("le", "")): value
        for name, labels, value in metric_samples(text)
        if name.startswith("vllm:trio_")
    }


def test_metrics_count_images_tokens_and_side_passes(trio_url: str, client: OpenAI) -> None:
    """Visual tokens before/after (API-server process) and side-pass time (engine
    process) on the server's /metrics, moving exactly with the requests sent."""
    before = _trio_metrics(trio_url)
    msgs = image_messages("what is shown?", [make_image(60)])
    for r in (1.0, 0.111, 0.5):
        chat(client, msgs, r)
    after = _trio_metrics(trio_url)

    def delta(name: str, label: str = "") -> float:
        return after.get((name, label), 0.0) - before.get((name, label), 0.0)

    tokens = "vllm:trio_image_visual_tokens"
    assert delta(f"{tokens}_count", "before") == 3
    assert delta(f"{tokens}_sum", "before") == 3 * N_112
    kept = N_112 + num_kept_tokens(N_112, 0.111) + num_kept_tokens(N_112, 0.5)
    assert delta(f"{tokens}_sum", "after") == kept
    assert delta("vllm:trio_keep_ratio_sum") == pytest.approx(1.611)
    assert delta("vllm:trio_keep_ratio_bucket", "0.111") == 1
    # r = 1 runs no side pass; the other two each ran one (their selections
    # differ, so neither came from the encoder cache).
    assert delta("vllm:trio_side_pass_seconds_count") == 2
    assert 0 < delta("vllm:trio_side_pass_seconds_sum") < 60
