"""Faults against the real ``vllm serve --plugin trio`` on 127.0.0.1.

Clients that disconnect during prefill, while an image's side pass runs and
during streaming; then SIGTERM with requests in flight. After every fault
vLLM's own accounting (Prometheus ``/metrics``) returns to idle: no running or
waiting request and ``vllm:kv_cache_usage_perc`` 0, i.e. no leaked KV block;
and a valid request gets exactly the answer it got before the faults.

Each fault is placed where it claims to be, and the test proves it:

* prefill: the client disconnects once ``/metrics`` shows the request holding
  KV blocks (prefill has started; a ~1,950-token prompt is ~30 chunks of 64
  tokens), and ``vllm:generation_tokens_total`` not moving proves it was
  aborted before its first token;
* side pass: the server runs with ``tests/engine_hooks/sitecustomize.py``,
  which holds a side pass inside the engine's step while a file exists. The
  test disconnects while it is held, waits until the API server has logged
  the abort, then releases it; a request queued behind it must still get its
  own answer;
* SIGTERM: vLLM's default (``--shutdown-timeout 0``, what ``docker stop``
  gets from the image) cuts in-flight streams with an error event; the server,
  engine core and worker exit with status 0 and leave no process behind.
  Draining (``--shutdown-timeout N``) is tested under load in
  ``tests/test_soak.py``.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import make_image

from trio_dev.local_server import RunningServer, image_chat_messages, vllm_server_process

pytestmark = pytest.mark.engine

DEPTH = 3  # the tiny checkpoint's deepest layer: the longest side pass
CHUNK = 64  # --max-num-batched-tokens: many prefill steps per long prompt
QUESTION = "what colour is the circle?"
IDLE_KEYS = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
HOOKS = Path(__file__).resolve().parent / "engine_hooks"


def payload(
    model: str,
    text: str,
    image_seeds: list[int],
    ratio: float = 0.25,
    max_tokens: int = 4,
    stream: bool = False,
) -> dict:
    return {
        "model": model,
        "messages": image_chat_messages(text, [make_image(s) for s in image_seeds]),
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "vllm_xargs": {"keep_ratio": ratio},
    }


def long_text(tokens: int) -> str:
    """About ``tokens`` prompt tokens (the tiny tokenizer reads 'a' as one token)."""
    return "a" * tokens


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("side_pass_gate")


@pytest.fixture(scope="module")
def server(
    tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory, gate: Path
) -> Iterator[RunningServer]:
    log = tmp_path_factory.mktemp("logs") / "faults_server.log"
    args = [
        "--plugin", "trio", "--trio-keep-ratio", "0.25", "--trio-depth", str(DEPTH),
        "--max-num-batched-tokens", str(CHUNK), "--enable-log-requests",
    ]  # fmt: skip
    pythonpath = os.pathsep.join(p for p in (str(HOOKS), os.environ.get("PYTHONPATH")) if p)
    env = {"PYTHONPATH": pythonpath, "TRIO_TEST_SIDE_PASS_GATE": str(gate)}
    with vllm_server_process(tiny_ckpt, args, log, env=env) as srv:
        yield srv


@pytest.fixture(scope="module")
def model(server: RunningServer) -> str:
    return httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]["id"]


def post(server: RunningServer, body: dict) -> dict:
    resp = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.fixture(scope="module")
def reference(server: RunningServer, model: str) -> dict:
    """The answer to a valid request before any fault."""
    return post(server, payload(model, QUESTION, [50]))


def wait_idle(server: RunningServer, timeout_s: float = 120) -> dict[str, float]:
    """Poll /metrics until vLLM reports no running/waiting request and no KV in use."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = server.metrics()
        if all(metrics[k] == 0 for k in IDLE_KEYS) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.1)


def assert_recovered(server: RunningServer, model: str, reference: dict) -> None:
    metrics = wait_idle(server)
    for key in IDLE_KEYS:
        assert metrics[key] == 0, f"{key}={metrics[key]} after the fault"
    got = post(server, payload(model, QUESTION, [50]))
    assert got["choices"][0]["message"]["content"] == reference["choices"][0]["message"]["content"]
    assert got["usage"] == reference["usage"]


def generation_tokens(server: RunningServer) -> float:
    return server.metrics()["vllm:generation_tokens_total"]


def aborts_logged(server: RunningServer) -> int:
    """``Aborted request(s)`` lines: the API server has sent the abort to the engine."""
    return server.log_path.read_text().count("Aborted request")


def wait_for(condition, what: str, timeout_s: float = 120, poll_s: float = 0.02) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll_s)


def test_disconnect_during_prefill(server: RunningServer, model: str, reference: dict) -> None:
    """Drop each long prompt once it holds KV blocks, i.e. while its chunks are prefilled."""
    before = generation_tokens(server)
    usage_at_drop = []
    for i in range(3):
        body = payload(model, f"{i} " + long_text(1900), [], max_tokens=64, stream=True)
        with (
            httpx.Client(timeout=120) as client,
            client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as resp,
        ):
            assert resp.status_code == 200
            wait_for(lambda: server.metrics()["vllm:kv_cache_usage_perc"] > 0, "prefill to start")
            usage_at_drop.append(server.metrics()["vllm:kv_cache_usage_perc"])
        # Leaving the block closed the connection mid-prefill.
        wait_idle(server)
    assert all(u > 0 for u in usage_at_drop)
    # None of them reached its first token: every abort landed in prefill.
    assert generation_tokens(server) - before == 0
    assert_recovered(server, model, reference)


def test_disconnect_while_the_side_pass_runs(
    server: RunningServer, model: str, reference: dict, gate: Path
) -> None:
    """Two images scored at depth 3 over ~1,900 tokens; the client leaves mid side pass."""
    text = long_text(1850)
    dropped = payload(model, f"drop {text}", [60, 61], ratio=0.111, max_tokens=8, stream=True)
    hold = gate / "hold"

    def held() -> int:
        return len(list(gate.glob("started-*")))

    held_before = held()
    hold.touch()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        before_tokens, before_aborts = generation_tokens(server), aborts_logged(server)
        with (
            httpx.Client(timeout=120) as client,
            client.stream("POST", f"{server.url}/v1/chat/completions", json=dropped) as resp,
        ):
            assert resp.status_code == 200
            wait_for(lambda: held() > held_before, "the side pass to start")
            # A valid request arrives while the engine is inside that step.
            queued = pool.submit(post, server, payload(model, QUESTION, [50]))
        wait_for(lambda: aborts_logged(server) > before_aborts, "the abort to be sent")
        assert hold.exists() and not queued.done()  # the side pass is still held
    finally:
        hold.unlink(missing_ok=True)
    behind = queued.result(timeout=300)
    pool.shutdown()
    assert (
        behind["choices"][0]["message"]["content"]
        == (reference["choices"][0]["message"]["content"])
    )
    metrics = wait_idle(server)
    assert all(metrics[k] == 0 for k in IDLE_KEYS), metrics
    # Only the queued request generated tokens; the dropped one none.
    assert generation_tokens(server) - before_tokens == behind["usage"]["completion_tokens"]

    # The same request again, not dropped, equals a fresh computation of it (a
    # ratio one float step lower keeps the same k but misses every cache).
    again = post(server, {**dropped, "stream": False})
    fresh = post(
        server, {**dropped, "stream": False, "vllm_xargs": {"keep_ratio": math.nextafter(0.111, 0)}}
    )
    assert again["usage"] == fresh["usage"]
    assert again["choices"][0]["message"]["content"] == fresh["choices"][0]["message"]["content"]
    assert_recovered(server, model, reference)


def test_disconnect_during_streaming(server: RunningServer, model: str, reference: dict) -> None:
    before = generation_tokens(server)

    def open_and_drop(body: dict) -> int:
        seen = 0
        with (
            httpx.Client(timeout=120) as client,
            client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as resp,
        ):
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    seen += 1
                    if seen >= 3:
                        break
        return seen

    bodies = [
        {**payload(model, f"story {i}: {QUESTION}", [70 + i], max_tokens=400, stream=True),
         "ignore_eos": True}
        for i in range(4)
    ]  # fmt: skip
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        seen = list(pool.map(open_and_drop, bodies))
    assert seen == [3, 3, 3, 3]
    wait_idle(server)
    # Aborted mid-stream: far fewer than the 4 x 400 tokens they asked for.
    assert generation_tokens(server) - before < 4 * 400 / 2
    assert_recovered(server, model, reference)


def test_sigterm_with_requests_in_flight(server: RunningServer, model: str) -> None:
    """Runs last: stops the module's server, as ``docker stop`` / Kubernetes do.

    vLLM's default shutdown cuts in-flight streams: each client gets an error
    event and the end of its stream (or a closed connection), none hangs. The
    server, engine core and worker exit with status 0 and no process is left
    behind. The only errors logged are vLLM 0.32's own EngineDeadError
    tracebacks for the engine going away under requests; nothing in vllm-trio.
    """

    progress = [0] * 6  # content chunks each stream has received

    def stream_until_closed(i: int) -> str:
        body = payload(model, f"story {i}: {QUESTION}", [80 + i], max_tokens=1000, stream=True)
        body["ignore_eos"] = True  # every stream would run far past the SIGTERM
        try:
            with (
                httpx.Client(timeout=120) as client,
                client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as resp,
            ):
                finish_reason = None
                for line in resp.iter_lines():
                    if line.startswith("data: {"):
                        event = json.loads(line.removeprefix("data: "))
                        if "error" in event:
                            return "error event"
                        progress[i] += 1
                        finish_reason = event["choices"][0].get("finish_reason") or finish_reason
            return f"finished: {finish_reason}"
        except httpx.HTTPError as exc:
            return type(exc).__name__

    pool = concurrent.futures.ThreadPoolExecutor(6)
    futures = [pool.submit(stream_until_closed, i) for i in range(6)]
    wait_for(lambda: min(progress) >= 2, "six streams to be under way", 120, 0.05)
    start = time.monotonic()
    code = server.stop(timeout_s=60)
    stop_s = time.monotonic() - start
    outcomes = [f.result(timeout=60) for f in futures]
    pool.shutdown()
    log = server.log_path.read_text()
    assert code == 0, f"exit code {code}; see {server.log_path}"
    assert server.leftover_pids == [], "engine/worker processes outlived the server"
    assert stop_s < 30, f"shutdown took {stop_s:.1f}s"
    # Every stream was in flight and was cut short, visibly to its client:
    # which of vLLM's ways depends on whether the engine core or the API
    # server notices first (an abort finish, or an error event).
    ways = {"finished: abort", "error event", "RemoteProtocolError", "ReadError"}
    assert all(o in ways for o in outcomes), outcomes
    assert max(progress) < 1000, progress
    assert "shutdown" in log
    after_sigterm = log[log.index("[shutdown]") :]
    assert "vllm_trio" not in after_sigterm
    errors = re.findall(
        r"^(?:\([^)]*\) ERROR [^\]]*\] )?(\w[\w.]*(?:Error|Exception)\b.*)$", after_sigterm, re.M
    )
    assert all(e.startswith("vllm.v1.engine.exceptions.EngineDeadError") for e in errors), errors
