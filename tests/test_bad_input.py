"""Bad input against the real ``vllm serve --plugin trio`` on 127.0.0.1.

Every case gets either a clear 4xx (naming the field where there is one) or a
documented, sensible 200; after each one the same valid request as at the
start must get the same answer, so nothing a client sends can poison the
engine, its caches or the next request. The behaviour chosen:

* ``vllm_xargs.keep_ratio`` must be a JSON number in (0, 1]: anything else
  (0, negatives, > 1, strings, booleans, lists, objects, null, NaN, Infinity)
  is a 400 naming ``vllm_xargs.keep_ratio``, also on a text-only request; a
  valid ratio on a text-only request is accepted and has no effect.
* Unknown ``vllm_xargs`` keys pass through (vLLM's own ``session_id`` and
  custom logits processors live there), except near misses of ``keep_ratio``
  (``keepRatio``, ``trio_keep_ratio``, ``keep_ratoi``): 400 "did you mean".
* Images: any size PIL decodes works (1x1, 1x3000, 4000x3000; modes RGBA, L,
  I;16, CMYK; GIF/WebP); undecodable, truncated, empty or decompression-bomb
  images, non-data/http URLs and ``file://`` without
  ``--allowed-local-media-path`` are 400 (the bomb and ``file://`` are 500 in
  stock vLLM 0.32; vllm_trio/patches/online_renderer.py maps them for TRIO models); an http
  404 is vLLM's 422; an unreachable host stays vLLM's 500 (transient: retry).
* More images than ``--limit-mm-per-prompt``: 400 naming ``image``.
* Context: TRIO scores each image inside its *unpruned* prompt, so a request
  is served only if that scoring context (text + the image's N tokens) fits
  ``max_model_len`` as well as the pruned prompt; otherwise 400 naming
  ``input_tokens``. The boundary (exactly ``max_model_len``) is accepted.
"""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import make_image
from PIL import Image, ImageDraw

from trio_dev.local_server import RunningServer, vllm_server_process
from vllm_trio.core.budget import num_kept_tokens

pytestmark = pytest.mark.engine

MAX_MODEL_LEN = 2048  # TEST_SERVER_ARGS
N_112 = 88  # visual tokens of a 112x112 image on the tiny checkpoint
DEFAULT_RATIO = 0.25
QUESTION = "what colour is the circle?"


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def messages(text: str, urls: list[str]) -> list[dict]:
    content: list[dict] = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]


def scene(width: int, height: int) -> Image.Image:
    """A simple drawing: compresses well even at 4000x3000 (a small request body)."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.ellipse([width // 8, height // 3, width // 3, 2 * height // 3], fill="red")
    draw.rectangle([5 * width // 8, height // 3, 7 * width // 8, 2 * height // 3], fill="blue")
    return img


GOOD_URL = data_url(encode(make_image(40)))


@dataclass
class Reply:
    status: int
    text: str
    body: dict = field(default_factory=dict)

    @property
    def content(self) -> str:
        return self.body["choices"][0]["message"]["content"]

    @property
    def prompt_tokens(self) -> int:
        return self.body["usage"]["prompt_tokens"]


class Client:
    """Raw HTTP (not the openai client) so bodies can be exactly what we want."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.model = requests.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]

    def chat(self, msgs: list[dict], xargs: dict | None = None, **extra: object) -> Reply:
        body: dict = {"model": self.model, "messages": msgs, "max_tokens": 4, "temperature": 0}
        if xargs is not None:
            body["vllm_xargs"] = xargs
        return self.post(json.dumps({**body, **extra}))

    def post(self, raw_body: str, path: str = "/v1/chat/completions") -> Reply:
        resp = requests.post(
            f"{self.url}{path}",
            data=raw_body,
            headers={"Content-Type": "application/json"},
            timeout=120,
        )
        try:
            body = resp.json()
        except ValueError:
            body = {}
        return Reply(resp.status_code, resp.text, body)

    def raw_xargs(self, msgs: list[dict], xargs_json: str) -> Reply:
        """A chat request whose ``vllm_xargs`` is spliced in as literal JSON text."""
        body = json.dumps(
            {"model": self.model, "messages": msgs, "max_tokens": 4, "temperature": 0}
        )
        return self.post(body[:-1] + f', "vllm_xargs": {xargs_json}}}')


class ImageHost(http.server.SimpleHTTPRequestHandler):
    """Serves image files on 127.0.0.1 for the http(s) URL cases."""

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: test output stays readable."""


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    log = tmp_path_factory.mktemp("logs") / "bad_input_server.log"
    args = ["--plugin", "trio", "--trio-keep-ratio", str(DEFAULT_RATIO), "--trio-depth", "1"]
    with vllm_server_process(tiny_ckpt, args, log) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Client:
    return Client(server.url)


@pytest.fixture(scope="module")
def baseline(client: Client) -> Reply:
    """The valid request every case is followed by, answered before any bad input."""
    reply = client.chat(messages(QUESTION, [GOOD_URL]))
    assert reply.status == 200, reply.text
    return reply


@pytest.fixture(scope="module")
def image_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("images")
    (root / "ok.png").write_bytes(encode(make_image(40)))
    handler = functools.partial(ImageHost, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def assert_still_serving(client: Client, baseline: Reply) -> None:
    """The next valid request gets exactly the answer it got before the bad one."""
    again = client.chat(messages(QUESTION, [GOOD_URL]))
    assert again.status == 200, again.text
    assert again.content == baseline.content
    assert again.prompt_tokens == baseline.prompt_tokens


def assert_client_error(reply: Reply, *needles: str, status: int = 400) -> None:
    assert reply.status == status, reply.text
    message = reply.body["error"]["message"]
    for needle in needles:
        assert needle in message, message


# --- keep_ratio values --------------------------------------------------------

BAD_RATIOS = [
    "0", "-0.5", "1.5", "1e9", "1.0000001", '"0.5"', '"abc"', '""', "true", "false",
    "[0.5]", '{"r": 0.5}', "null", "NaN", "Infinity", "-Infinity",
]  # fmt: skip


@pytest.mark.parametrize("raw", BAD_RATIOS)
def test_bad_keep_ratio_is_400_naming_the_field(client: Client, baseline: Reply, raw: str) -> None:
    reply = client.raw_xargs(messages(QUESTION, [GOOD_URL]), f'{{"keep_ratio": {raw}}}')
    assert reply.status == 400, reply.text
    assert "vllm_xargs.keep_ratio" in reply.text
    assert_still_serving(client, baseline)


@pytest.mark.parametrize("raw", ["0", "1.5", '"0.5"', "true", "null", "NaN"])
def test_bad_keep_ratio_without_an_image_is_still_400(
    client: Client, baseline: Reply, raw: str
) -> None:
    """Validated even where it would have no effect: the client's bug surfaces early."""
    reply = client.raw_xargs([{"role": "user", "content": "hello"}], f'{{"keep_ratio": {raw}}}')
    assert reply.status == 400, reply.text
    assert "vllm_xargs.keep_ratio" in reply.text
    assert_still_serving(client, baseline)


def test_bad_keep_ratio_when_streaming_is_400_before_the_stream(
    client: Client, baseline: Reply
) -> None:
    reply = client.chat(messages(QUESTION, [GOOD_URL]), {"keep_ratio": 2}, stream=True)
    assert_client_error(reply, "vllm_xargs.keep_ratio")
    assert_still_serving(client, baseline)


def test_bad_keep_ratio_on_completions_is_400(client: Client, baseline: Reply) -> None:
    for raw in ("true", "0", '"1"'):
        body = json.dumps({"model": client.model, "prompt": "a red circle", "max_tokens": 2})
        reply = client.post(
            body[:-1] + f', "vllm_xargs": {{"keep_ratio": {raw}}}}}', "/v1/completions"
        )
        assert_client_error(reply, "vllm_xargs.keep_ratio")
    assert_still_serving(client, baseline)


def test_bad_mm_processor_kwargs_ratio_is_400(client: Client, baseline: Reply) -> None:
    reply = client.chat(messages(QUESTION, [GOOD_URL]), mm_processor_kwargs={"trio_keep_ratio": 0})
    assert_client_error(reply, "mm_processor_kwargs.trio_keep_ratio")
    assert_still_serving(client, baseline)


def test_valid_extreme_ratios(client: Client, baseline: Reply) -> None:
    """1e-9 keeps one token (k >= 1); integer 1 is the same as 1.0 (no pruning)."""
    text_tokens = baseline.prompt_tokens - num_kept_tokens(N_112, DEFAULT_RATIO)
    tiny = client.chat(messages(QUESTION, [GOOD_URL]), {"keep_ratio": 1e-9})
    assert tiny.status == 200, tiny.text
    assert tiny.prompt_tokens == text_tokens + 1
    one_int = client.raw_xargs(messages(QUESTION, [GOOD_URL]), '{"keep_ratio": 1}')
    one_float = client.raw_xargs(messages(QUESTION, [GOOD_URL]), '{"keep_ratio": 1.0}')
    assert one_int.status == one_float.status == 200, one_int.text + one_float.text
    assert one_int.prompt_tokens == one_float.prompt_tokens == text_tokens + N_112
    assert one_int.content == one_float.content
    assert_still_serving(client, baseline)


def test_ratio_on_a_text_only_request_is_accepted_and_ignored(
    client: Client, baseline: Reply
) -> None:
    msgs = [{"role": "user", "content": "tell me about circles"}]
    plain = client.chat(msgs)
    assert plain.status == 200, plain.text
    for ratio in (0.111, 0.5, 1.0):
        with_ratio = client.chat(msgs, {"keep_ratio": ratio})
        assert with_ratio.status == 200, with_ratio.text
        assert with_ratio.content == plain.content
        assert with_ratio.prompt_tokens == plain.prompt_tokens
    assert_still_serving(client, baseline)


# --- other vllm_xargs keys ----------------------------------------------------


def test_unknown_xargs_pass_through(client: Client, baseline: Reply) -> None:
    """vLLM's open extension dict: unrelated keys are neither refused nor interpreted."""
    reply = client.chat(
        messages(QUESTION, [GOOD_URL]), {"my_logits_processor_arg": 3, "tag": "abc"}
    )
    assert reply.status == 200, reply.text
    assert reply.content == baseline.content
    assert reply.prompt_tokens == baseline.prompt_tokens


@pytest.mark.parametrize("key", ["keepRatio", "keep-ratio", "trio_keep_ratio", "keep_ratoi"])
def test_misspelt_keep_ratio_is_400_with_a_hint(client: Client, baseline: Reply, key: str) -> None:
    reply = client.chat(messages(QUESTION, [GOOD_URL]), {key: 0.5})
    assert_client_error(reply, f"vllm_xargs.{key}", "did you mean vllm_xargs.keep_ratio")
    assert reply.body["error"]["param"] == f"vllm_xargs.{key}"
    assert_still_serving(client, baseline)


# --- images -----------------------------------------------------------------


def _text_tokens(client: Client) -> int:
    """Prompt tokens of the baseline text with the image's placeholders left out."""
    full = client.chat(messages(QUESTION, [GOOD_URL]), {"keep_ratio": 1.0})
    assert full.status == 200, full.text
    return full.prompt_tokens - N_112


@pytest.mark.parametrize(
    "size", [(1, 1), (2, 1), (1, 3000), (3000, 1), (4000, 3000)], ids=lambda s: f"{s[0]}x{s[1]}"
)
def test_odd_image_sizes_are_served_and_pruned(
    client: Client, baseline: Reply, size: tuple[int, int]
) -> None:
    text = _text_tokens(client)
    url = data_url(encode(scene(*size)))
    full = client.chat(messages(QUESTION, [url]), {"keep_ratio": 1.0})
    assert full.status == 200, full.text
    n = full.prompt_tokens - text
    for ratio in (0.5, 0.111):
        pruned = client.chat(messages(QUESTION, [url]), {"keep_ratio": ratio})
        assert pruned.status == 200, pruned.text
        assert pruned.prompt_tokens == text + num_kept_tokens(n, ratio)
    assert_still_serving(client, baseline)


def _i16_image() -> Image.Image:
    return Image.fromarray(np.asarray(make_image(41).convert("L")).astype(np.uint16) * 256)


IMAGE_FORMATS = {
    "rgba": lambda: data_url(encode(make_image(41).convert("RGBA"))),
    "grey": lambda: data_url(encode(make_image(41).convert("L"))),
    "16bit": lambda: data_url(encode(_i16_image())),
    "cmyk-jpeg": lambda: data_url(encode(make_image(41).convert("CMYK"), "JPEG"), "image/jpeg"),
    "gif": lambda: data_url(encode(make_image(41), "GIF"), "image/gif"),
    "webp": lambda: data_url(encode(make_image(41), "WEBP"), "image/webp"),
    # The mime type is not trusted: PIL sniffs the bytes.
    "png-labelled-text": lambda: data_url(encode(make_image(41)), "text/plain"),
}


@pytest.mark.parametrize("name", IMAGE_FORMATS)
def test_image_modes_and_formats_are_served(client: Client, baseline: Reply, name: str) -> None:
    reply = client.chat(messages(QUESTION, [IMAGE_FORMATS[name]()]), {"keep_ratio": 0.25})
    assert reply.status == 200, f"{name}: {reply.text}"
    assert_still_serving(client, baseline)


def _bomb_png() -> bytes:
    """20000x20000 pixels in a few kB: over PIL's decompression-bomb limit."""
    return encode(Image.new("1", (20000, 20000)))


BAD_IMAGES = {
    "truncated-png": (data_url(encode(make_image(42))[:200]), "Failed to load image"),
    "truncated-jpeg": (
        data_url(encode(make_image(42), "JPEG")[:300], "image/jpeg"),
        "Failed to load image",
    ),
    "not-an-image": (data_url(b"hello, I am not a PNG at all"), "Failed to load image"),
    "empty-data": ("data:image/png;base64,", "Failed to load image"),
    "bad-base64": ("data:image/png;base64,@@@not base64!", "base64"),
    "ftp-scheme": ("ftp://127.0.0.1/a.png", "URL must be either a HTTP, data or file URL"),
    "not-a-url": ("not a url", "Failed to parse"),
    "file-without-allowed-path": ("file:///etc/hostname", "--allowed-local-media-path"),
}


@pytest.mark.parametrize("name", [*BAD_IMAGES, "decompression-bomb"])
def test_bad_images_are_400(client: Client, baseline: Reply, name: str) -> None:
    if name == "decompression-bomb":
        url, needle = data_url(_bomb_png()), "image too large"
    else:
        url, needle = BAD_IMAGES[name]
    reply = client.chat(messages(QUESTION, [url]))
    assert_client_error(reply, needle)
    assert_still_serving(client, baseline)


def test_http_image_urls(client: Client, baseline: Reply, image_host: str) -> None:
    """An image fetched over http gets the same answer as the same bytes inline.

    A 404 is vLLM's own 422 naming ``image_url``. A refused connection stays
    vLLM's 500 with the cause in the message: vLLM keeps transient fetch
    failures (connection errors, timeouts, upstream 5xx) 5xx so clients retry.
    """
    reply = client.chat(messages(QUESTION, [f"{image_host}/ok.png"]))
    assert reply.status == 200, reply.text
    assert reply.content == baseline.content
    missing = client.chat(messages(QUESTION, [f"{image_host}/missing.png"]))
    assert_client_error(missing, "HTTP 404", status=422)
    assert missing.body["error"]["param"] == "image_url"
    refused = client.chat(messages(QUESTION, ["http://127.0.0.1:1/a.png"]))
    assert_client_error(refused, "Cannot connect to host 127.0.0.1:1", status=500)
    assert_still_serving(client, baseline)


def test_more_images_than_allowed_is_400(client: Client, baseline: Reply) -> None:
    reply = client.chat(messages(QUESTION, [GOOD_URL] * 3))
    assert_client_error(reply, "At most 2 image(s)")
    assert reply.body["error"]["param"] == "image"
    assert_still_serving(client, baseline)


def test_literal_image_tag_in_text_is_harmless(client: Client, baseline: Reply) -> None:
    """User text that spells the placeholder must not confuse which image is scored."""
    for msgs in (
        messages("look at <image> please", [GOOD_URL]),
        [{"role": "user", "content": "no picture, just <image> text"}],
    ):
        reply = client.chat(msgs, {"keep_ratio": 0.25})
        assert reply.status == 200, reply.text
    assert_still_serving(client, baseline)


# --- context length -----------------------------------------------------------


def _long_text_tokens(client: Client) -> tuple[int, int]:
    """(text tokens with a 10-char filler, tokens per extra filler char) of an image prompt."""
    short = client.chat(messages("a" * 10, [GOOD_URL]), {"keep_ratio": 1.0}, max_tokens=1)
    longer = client.chat(messages("a" * 110, [GOOD_URL]), {"keep_ratio": 1.0}, max_tokens=1)
    assert short.status == longer.status == 200, short.text + longer.text
    per_char, rem = divmod(longer.prompt_tokens - short.prompt_tokens, 100)
    assert rem == 0 and per_char == 1, "the tiny tokenizer encodes 'a' as one token"
    return short.prompt_tokens - N_112, per_char


def _filler(client: Client, text_tokens: int) -> str:
    """Filler text giving the image prompt exactly ``text_tokens`` non-image tokens."""
    base, _ = _long_text_tokens(client)
    return "a" * (10 + text_tokens - base)


def test_scoring_context_over_the_limit_is_400_even_if_the_pruned_prompt_fits(
    client: Client, baseline: Reply
) -> None:
    text = _filler(client, MAX_MODEL_LEN - N_112 + 20)  # unpruned: max + 20
    msgs = messages(text, [GOOD_URL])
    reply = client.chat(msgs, {"keep_ratio": 0.111}, max_tokens=1)  # pruned: max - 68
    assert_client_error(reply, "unpruned prompt", f"maximum context length ({MAX_MODEL_LEN})")
    assert reply.body["error"]["param"] == "input_tokens"
    # No pruning: vLLM's own check on the (unpruned = pruned) prompt.
    stock = client.chat(msgs, {"keep_ratio": 1.0}, max_tokens=1)
    assert_client_error(stock, "exceeds model's maximum context length")
    assert_still_serving(client, baseline)


def test_scoring_context_at_the_limit_is_served(client: Client, baseline: Reply) -> None:
    """Unpruned exactly ``max_model_len``: the side pass runs over 2048 positions."""
    text = _filler(client, MAX_MODEL_LEN - N_112)
    reply = client.chat(messages(text, [GOOD_URL]), {"keep_ratio": 0.111}, max_tokens=1)
    assert reply.status == 200, reply.text
    assert reply.prompt_tokens == MAX_MODEL_LEN - N_112 + num_kept_tokens(N_112, 0.111)
    assert_still_serving(client, baseline)


def test_text_only_prompt_over_the_limit_is_400(client: Client, baseline: Reply) -> None:
    reply = client.chat([{"role": "user", "content": "a" * 2100}], {"keep_ratio": 0.5})
    assert_client_error(reply, "maximum context length")
    assert_still_serving(client, baseline)


@pytest.mark.parametrize(
    ("ratio", "text_tokens"),
    [(1.0, MAX_MODEL_LEN - N_112 + 40), (1.0, MAX_MODEL_LEN - N_112), (0.25, MAX_MODEL_LEN - 8)],
    ids=["image-overflows", "no-room-for-output", "scoring-context-overflows"],
)
def test_too_long_request_does_not_poison_the_next_one_with_that_image(
    client: Client, baseline: Reply, ratio: float, text_tokens: int
) -> None:
    """A request refused for length *after* its image was processed must not
    leave the image half-cached: the next request with that image is served.

    vLLM 0.32 checks the prompt length after multimodal processing, when its
    sender cache already records the image as sent to the engine; the refused
    request never reaches the engine, so the next request with that image
    would go without the data and fail with a 500 ("P0/P1 cache drift"). The
    text alone fits here, so only the image tips the prompt over the limit.
    """
    seed = {1.0: 43, 0.25: 44}[ratio] + text_tokens
    url = data_url(encode(make_image(seed)))
    too_long = client.chat(
        messages(_filler(client, text_tokens), [url]), {"keep_ratio": ratio}, max_tokens=1
    )
    assert too_long.status == 400, too_long.text
    reply = client.chat(messages(QUESTION, [url]), {"keep_ratio": ratio})
    assert reply.status == 200, reply.text
    again = client.chat(messages(QUESTION, [url]), {"keep_ratio": ratio})
    assert (again.status, again.content) == (200, reply.content)
    assert_still_serving(client, baseline)


def test_engine_is_idle_and_healthy_after_all_of_it(
    server: RunningServer, client: Client, baseline: Reply
) -> None:
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200
    metrics = server.metrics()
    assert metrics["vllm:num_requests_running"] == 0
    assert metrics["vllm:kv_cache_usage_perc"] == 0
    assert_still_serving(client, baseline)
