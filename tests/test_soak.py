"""Short, bounded soak of the real server (the long form is ``python benchmarks/soak.py``).

80 mixed requests, 16 concurrent (ratios 1/0.5/0.222/0.111 and the server
default, one and two images of several sizes, text-only, some cancelled
mid-stream), after a warm-up of the same shape. Every valid request succeeds,
each answer equals the same request's answer sent alone, vLLM's /metrics
returns to idle (no running request, no KV block in use) and the resident
memory of the server's process tree stays within the bound justified in
``benchmarks/soak.py``. The summary is printed (``pytest -s``) and written
next to the server log.

Then SIGTERM under load with ``--shutdown-timeout``: vLLM stops taking work
and drains what is in flight; every request in flight is answered in full,
exactly as when sent alone, and the server exits 0 with no process left.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import json
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from types import ModuleType

import httpx
import pytest

from trio_dev.local_server import RunningServer, vllm_server_process

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RATIO = 0.25
REQUESTS, CONCURRENCY = 80, 16
DRAIN_S = 120  # --shutdown-timeout
DRAIN_MAX_TOKENS = 96  # long enough to be decoding when SIGTERM arrives


def load_soak() -> ModuleType:
    """``benchmarks/soak.py`` by path (``benchmarks`` need not be importable)."""
    name = "trio_soak_benchmark"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module's annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    log = tmp_path_factory.mktemp("logs") / "soak_server.log"
    args = [
        *load_soak().SERVER_ARGS, "--trio-keep-ratio", str(DEFAULT_RATIO), "--trio-depth", "1",
        "--shutdown-timeout", str(DRAIN_S),
    ]  # fmt: skip
    with vllm_server_process(tiny_ckpt, args, log) as srv:
        yield srv


def test_plan_is_mixed() -> None:
    soak = load_soak()
    specs = soak.plan(REQUESTS, seed=0)
    assert {s.ratio for s in specs} == {*soak.RATIOS, None}
    assert {len(s.images) for s in specs} == {0, 1, 2}
    assert {size for s in specs for _, size in s.images} == set(soak.SIZES)
    assert sum(1 for s in specs if s.cancel_after_chunks) >= 3
    assert len({s.question for s in specs}) == REQUESTS  # every request its own side pass


def test_short_soak(server: RunningServer) -> None:
    soak = load_soak()
    result = soak.soak(
        server, num_requests=REQUESTS, concurrency=CONCURRENCY, default_ratio=DEFAULT_RATIO
    )
    report = soak.summary(result)
    print("\n" + report)
    (server.log_path.parent / "soak.json").write_text(json.dumps(asdict(result), indent=2))
    assert not result.failures, report + f"\n{result.failures}"
    assert not result.mismatches, report + f"\n{result.mismatches}"
    assert result.cancelled >= 3 and result.completed + result.cancelled == REQUESTS, report
    assert result.metrics_after["vllm:num_requests_running"] == 0, report
    assert result.metrics_after["vllm:num_requests_waiting"] == 0, report
    assert result.metrics_after["vllm:kv_cache_usage_perc"] == 0, report
    assert result.rss_growth_mib <= result.rss_growth_bound_mib, report
    assert result.passed, report


def test_side_pass_leaves_nothing_behind(trio_llm_nocache) -> None:
    """Exact, in-process: many side passes leave no autograd tensor alive and no RSS growth.

    Every request has its own question, so each one runs its own side pass
    (checked in the model's selection log); a graph kept alive anywhere would
    keep its leaf (``requires_grad``) or a tensor with a ``grad_fn`` reachable.
    """
    import gc

    import psutil
    import torch
    from conftest import chat_prompt, make_image
    from vllm import SamplingParams

    llm = trio_llm_nocache
    tokenizer = llm.get_tokenizer()
    sizes = [(56, 56), (112, 112), (168, 56), (56, 168), (300, 200), (1600, 1200)]
    images = [make_image(200 + i, sizes[i % len(sizes)]) for i in range(12)]

    def run_round(r: int) -> None:
        prompts = [chat_prompt(f"leak check {r}.{i}: where is the circle?") for i in range(12)]
        requests = [
            {
                "prompt": prompt,
                "multi_modal_data": {"image": image},
                "mm_processor_kwargs": {"trio_keep_ratio": (0.111, 0.25, 0.5)[i % 3]},
            }
            for i, (prompt, image) in enumerate(zip(prompts, images, strict=True))
        ]
        llm.generate(requests, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
        [logged] = llm.apply_model(
            lambda model: {rec.prompt_ids for rec in model.trio_selection_log}
        )
        assert all(tuple(tokenizer.encode(p)) in logged for p in prompts), "side pass skipped"

    def live_tensors() -> tuple[int, int]:
        """(tensors in an autograd graph, bytes of all tensors) reachable from Python."""
        gc.collect()
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and not o.is_meta]
        in_graph = sum(1 for t in tensors if t.requires_grad or t.grad_fn is not None)
        return in_graph, sum(t.untyped_storage().nbytes() for t in tensors)

    # Warm-up: vLLM's encoder cache keeps the (pruned) embeddings of finished
    # requests until their space is needed; 144 images fill its 2,048 tokens.
    for r in range(12):
        run_round(r)
    _, bytes_before = live_tensors()
    rss_before = psutil.Process().memory_info().rss
    for r in range(12, 18):  # 72 more side passes
        run_round(r)
        in_graph, _ = live_tensors()
        assert in_graph == 0, f"{in_graph} tensors of an autograd graph still alive"
    _, bytes_after = live_tensors()
    # Measured: 0 bytes. Keeping only the hidden states of each side pass
    # (no graph) would add ~46 KiB x 72 = 3.2 MiB (tried).
    assert bytes_after - bytes_before < 256 << 10, f"{bytes_after - bytes_before} bytes more"
    growth_mib = (psutil.Process().memory_info().rss - rss_before) / 2**20
    assert growth_mib < 16, f"RSS grew {growth_mib:.1f} MiB over 72 side passes"


def test_sigterm_drains_requests_in_flight(server: RunningServer) -> None:
    """Runs last: stops the module's server with 16 mixed requests in the engine."""
    soak = load_soak()
    model = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]["id"]
    specs = [
        replace(s, max_tokens=DRAIN_MAX_TOKENS, cancel_after_chunks=None)
        for s in soak.plan(CONCURRENCY, seed=7, cancel_fraction=0)
    ]

    def payload(spec) -> dict:
        # ignore_eos: every request is still decoding when SIGTERM arrives.
        return {**soak.body(spec, model, DEFAULT_RATIO), "ignore_eos": True}

    async def send_all(payloads: list[dict], concurrent_: bool) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=600) as client:
            url = f"{server.url}/v1/chat/completions"
            if concurrent_:
                return list(await asyncio.gather(*(client.post(url, json=p) for p in payloads)))
            return [await client.post(url, json=p) for p in payloads]

    def answers(responses: list[httpx.Response]) -> list[tuple[str, int]]:
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        return [
            (r.json()["choices"][0]["message"]["content"], r.json()["usage"]["completion_tokens"])
            for r in responses
        ]

    alone = answers(asyncio.run(send_all([payload(s) for s in specs], concurrent_=False)))
    assert all(tokens == DRAIN_MAX_TOKENS for _, tokens in alone)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        burst = pool.submit(asyncio.run, send_all([payload(s) for s in specs], concurrent_=True))
        deadline = time.monotonic() + 120
        while True:  # all 16 have reached the engine, none has finished
            metrics = server.metrics()
            if metrics["vllm:num_requests_running"] + metrics["vllm:num_requests_waiting"] == 16:
                break
            assert time.monotonic() < deadline and not burst.done(), metrics
            time.sleep(0.02)
        start = time.monotonic()
        code = server.stop(timeout_s=DRAIN_S + 60)
        stop_s = time.monotonic() - start
        drained = answers(burst.result(timeout=60))
    assert code == 0, f"exit code {code}; see {server.log_path}"
    assert server.leftover_pids == [], "engine/worker processes outlived the server"
    assert stop_s < DRAIN_S, f"shutdown took {stop_s:.1f}s"
    assert drained == alone
    # vLLM's engine core drained requests that had not finished at SIGTERM.
    drain = re.search(r"draining in-flight requests count=(\d+)", server.log_path.read_text())
    assert drain is not None and int(drain.group(1)) >= 8, drain
