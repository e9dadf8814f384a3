"""Soak test of ``vllm serve --plugin trio``: many concurrent mixed requests, nothing lost.

What it checks, against a real server on 127.0.0.1:

* every valid request succeeds (HTTP 200, a non-empty answer);
* no request gets another's result: each answer equals the answer the same
  request gets when sent alone (greedy decoding), and its prompt-token count
  matches;
* some streamed requests are cancelled mid-stream (the client closes the
  connection); afterwards vLLM's own /metrics shows no running request and an
  empty KV cache (no leaked blocks);
* resident memory (sum of RSS over the API server, engine core and workers)
  does not grow across the measured run, after a warm-up.

The solo references must not share anything with the concurrent run, or a mix-up
in the concurrent run would be copied into its own reference. So each solo
request uses a keep ratio one float step below the soak's
(``math.nextafter(r, 0)``): the same number of kept tokens k for every image
size (checked), hence the same selection and answer,
but a different multimodal hash, so the processor cache, encoder cache and
prefix cache all miss and the solo run recomputes everything, side pass
included. Each soak request also has its own question text, so every image
request runs its own side pass.

Long form (the default) prints a summary and saves ``benchmarks/results/soak.json``::

    python benchmarks/soak.py                      # 240 requests, 16 concurrent
    python benchmarks/soak.py --requests 400 --concurrency 32
    python benchmarks/soak.py --mode layer --out benchmarks/results/soak_layer.json

``tests/test_soak.py`` runs the same code in a short, bounded form.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
from PIL import Image, ImageDraw

from trio_dev.local_server import image_chat_messages

RESULTS = Path(__file__).resolve().parent / "results"
RATIOS = (1.0, 0.5, 0.222, 0.111)
#: (width, height): the tiny checkpoint's anyres grids, an odd shape, and a
#: large photo-sized image (resized by the processor, so only decoding costs).
SIZES = ((56, 56), (112, 112), (168, 56), (56, 168), (300, 200), (1600, 1200))
QUESTIONS = (
    "what colour is the circle",
    "where is the square",
    "how many shapes are there",
    "is the background white",
    "describe the picture",
)
#: RSS growth allowed over the measured run: a fixed part for allocator and
#: garbage-collector noise plus a part per measured request. Why per request:
#: vLLM 0.32's CPU build itself grows under this load after warm-up, without
#: TRIO. Measured here (same plan shape, 80 requests per round, 16 concurrent,
#: growth of the server + engine + worker tree in the second round, i.e. after
#: a warm-up of 2x the measured run, the default below): stock LLaVA-NeXT
#: (no ``--plugin trio``) +55 MiB, TRIO at ratio 1 (no side pass) +87 MiB,
#: TRIO mixed ratios +62 MiB; mostly in the worker, decaying over later rounds
#: (about +20 MiB per 80 requests after 800) and unchanged with
#: MALLOC_ARENA_MAX=1. So the bound is 32 MiB + 1 MiB per request (112 MiB
#: for the CI form, 272 MiB for the long form). On this tiny checkpoint an
#: RSS bound cannot see a leaked side-pass graph (tens to hundreds of KiB per
#: image); ``tests/test_soak.py::test_side_pass_leaves_nothing_behind``
#: checks that exactly, in-process. On a real model the same leak (the hidden
#: states of a 3,000-token prompt at width 4,096 alone are 48 MiB per image)
#: crosses this bound within a few requests.
RSS_GROWTH_BASE_MIB = 32.0
RSS_GROWTH_PER_REQUEST_MIB = 1.0
#: Server flags of the soak. The multimodal processor cache is off because it
#: is an LRU of up to 4 GiB by default that legitimately grows by every new
#: image until full, which would hide (or fake) a leak in the RSS check; the
#: cache paths are covered by tests/test_bad_input.py and tests/test_engine.py.
SERVER_ARGS = ("--plugin", "trio", "--mm-processor-cache-gb", "0")


@dataclass(frozen=True)
class Spec:
    """One request of the soak plan."""

    index: int
    images: tuple[tuple[int, tuple[int, int]], ...]  # (seed, (width, height))
    question: str
    ratio: float | None  # None: the server default
    max_tokens: int
    cancel_after_chunks: int | None = None  # streamed and cancelled


@dataclass
class Outcome:
    index: int
    ok: bool
    status: int | None = None
    text: str = ""
    prompt_tokens: int | None = None
    latency_s: float = 0.0
    cancelled: bool = False
    error: str = ""


@dataclass
class SoakResult:
    requests: int
    concurrency: int
    completed: int
    cancelled: int
    failures: list[dict[str, Any]] = field(default_factory=list)
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    latency_p50_s: float = 0.0
    latency_p99_s: float = 0.0
    duration_s: float = 0.0
    rss_before_mib: float = 0.0
    rss_after_mib: float = 0.0
    rss_growth_mib: float = 0.0
    rss_growth_bound_mib: float = 0.0
    metrics_after: dict[str, float] = field(default_factory=dict)
    ratios: tuple[float, ...] = RATIOS
    sizes: tuple[tuple[int, int], ...] = SIZES

    @property
    def passed(self) -> bool:
        return (
            not self.failures
            and not self.mismatches
            and self.rss_growth_mib <= self.rss_growth_bound_mib
            and self.metrics_after.get("vllm:num_requests_running", 1) == 0
            and self.metrics_after.get("vllm:kv_cache_usage_perc", 1) == 0
        )


def make_image(seed: int, size: tuple[int, int]) -> Image.Image:
    """Shapes at seeded places and colours: distinct images, small PNGs at any size."""
    rng = random.Random(seed)
    w, h = size
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1, y1 = x0 + rng.randrange(1, w // 2 + 2), y0 + rng.randrange(1, h // 2 + 2)
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    return img


def plan(
    num_requests: int,
    seed: int = 0,
    ratios: Sequence[float] = RATIOS,
    sizes: Sequence[tuple[int, int]] = SIZES,
    cancel_fraction: float = 0.1,
    max_tokens: int = 8,
) -> list[Spec]:
    """A reproducible mix: mostly one image, some two-image and text-only requests,
    all ratios (and the server default), all sizes, a fraction cancelled mid-stream."""
    rng = random.Random(seed)
    specs = []
    for i in range(num_requests):
        kind = rng.random()
        n_images = 0 if kind < 0.1 else (2 if kind < 0.25 else 1)
        images = tuple(
            (seed * 100_000 + i * 10 + j, sizes[(i + j) % len(sizes)]) for j in range(n_images)
        )
        ratio = None if i % (len(ratios) + 1) == len(ratios) else ratios[i % (len(ratios) + 1)]
        cancel = rng.random() < cancel_fraction
        specs.append(
            Spec(
                index=i,
                images=images,
                question=f"{QUESTIONS[i % len(QUESTIONS)]} (request {i})?",
                ratio=ratio,
                max_tokens=64 if cancel else max_tokens,
                cancel_after_chunks=2 if cancel else None,
            )
        )
    return specs


def solo_ratio(ratio: float) -> float:
    """One float step below ``ratio``: the same k for every N (``num_kept_tokens``
    rounds with a 1e-9 slack; checked in :func:`soak`), but a different
    multimodal hash."""
    return math.nextafter(ratio, 0.0)


def body(spec: Spec, model: str, default_ratio: float, solo: bool = False) -> dict[str, Any]:
    images = [make_image(s, size) for s, size in spec.images]
    out: dict[str, Any] = {
        "model": model,
        "messages": image_chat_messages(spec.question, images),
        "max_tokens": spec.max_tokens,
        "temperature": 0,
    }
    ratio = spec.ratio
    if solo and spec.images:
        ratio = solo_ratio(default_ratio if ratio is None else ratio)
    if ratio is not None:
        out["vllm_xargs"] = {"keep_ratio": ratio}
    if spec.cancel_after_chunks is not None and not solo:
        out["stream"] = True
    if solo:
        # Its own prefix-cache namespace: the reference recomputes every block.
        out["cache_salt"] = "soak-solo-reference"
    return out


async def send(client: httpx.AsyncClient, url: str, spec: Spec, payload: dict) -> Outcome:
    start = time.perf_counter()
    outcome = Outcome(index=spec.index, ok=False)
    try:
        if payload.get("stream"):
            async with client.stream("POST", f"{url}/v1/chat/completions", json=payload) as resp:
                outcome.status = resp.status_code
                chunks = 0
                async for line in resp.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        chunks += 1
                        if chunks >= (spec.cancel_after_chunks or 0):
                            break  # leaving the block closes the connection mid-stream
                outcome.cancelled = True
                outcome.ok = resp.status_code == 200 and chunks > 0
        else:
            resp = await client.post(f"{url}/v1/chat/completions", json=payload)
            outcome.status = resp.status_code
            data = resp.json()
            if resp.status_code == 200:
                outcome.text = data["choices"][0]["message"]["content"]
                outcome.prompt_tokens = data["usage"]["prompt_tokens"]
                outcome.ok = bool(outcome.text)
            else:
                outcome.error = json.dumps(data)[:500]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.latency_s = time.perf_counter() - start
    return outcome


async def run_concurrent(
    url: str, specs: Sequence[Spec], model: str, default_ratio: float, concurrency: int
) -> list[Outcome]:
    """Send ``specs`` with at most ``concurrency`` in flight; outcomes in plan order."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def one(spec: Spec) -> Outcome:
            async with sem:
                return await send(client, url, spec, body(spec, model, default_ratio))

        return list(await asyncio.gather(*(one(s) for s in specs)))


async def run_solo(url: str, specs: Sequence[Spec], model: str, default_ratio: float) -> dict:
    """Each completed-in-full spec alone, one at a time: index -> Outcome."""
    out = {}
    async with httpx.AsyncClient(timeout=600) as client:
        for spec in specs:
            if spec.cancel_after_chunks is None:
                payload = body(spec, model, default_ratio, solo=True)
                out[spec.index] = await send(client, url, spec, payload)
    return out


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def wait_idle(server: Any, timeout_s: float = 60) -> dict[str, float]:
    """vLLM's /metrics once no request runs or waits (aborts settle asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = server.metrics()
        idle = (
            metrics.get("vllm:num_requests_running", 0) == 0
            and metrics.get("vllm:num_requests_waiting", 0) == 0
            and metrics.get("vllm:kv_cache_usage_perc", 0) == 0
        )
        if idle or time.monotonic() > deadline:
            return {
                k: metrics.get(k, float("nan"))
                for k in (
                    "vllm:num_requests_running",
                    "vllm:num_requests_waiting",
                    "vllm:kv_cache_usage_perc",
                )
            }
        time.sleep(0.5)


def soak(
    server: Any,
    num_requests: int,
    concurrency: int,
    default_ratio: float,
    warmup_requests: int | None = None,
    seed: int = 0,
    cancel_fraction: float = 0.1,
    sizes: Sequence[tuple[int, int]] = SIZES,
    ratios: Sequence[float] = RATIOS,
) -> SoakResult:
    """Warm up, measure RSS, run the soak, measure RSS, then check every answer.

    ``server`` is a :class:`trio_dev.local_server.RunningServer` (anything with
    ``url``, ``rss_bytes()`` and ``metrics()``).
    """
    from vllm_trio.core.budget import num_kept_tokens

    for r in (*ratios, default_ratio):
        for n in range(1, 8192):
            assert num_kept_tokens(n, solo_ratio(r)) == num_kept_tokens(n, r), (r, n)
    model = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]["id"]
    specs = plan(num_requests, seed, ratios, sizes, cancel_fraction)
    # Warm-up: the same mix (other images and questions, cancellations too) at
    # the same concurrency and twice as long as the measured run, so every
    # shape, code path, cache and allocator arena is in use before measuring
    # (a fresh server's first rounds grow fastest; see RSS_GROWTH_BASE_MIB).
    warm_n = warmup_requests or max(2 * num_requests, 4 * concurrency)
    warm = plan(warm_n, seed + 1, ratios, sizes, cancel_fraction)
    warm_out = asyncio.run(run_concurrent(server.url, warm, model, default_ratio, concurrency))
    failures = [asdict(o) for o in warm_out if not o.ok]
    # ... and the sequential path of the solo references.
    asyncio.run(run_solo(server.url, warm[: 2 * concurrency], model, default_ratio))
    wait_idle(server)
    rss_before = server.rss_bytes()
    start = time.perf_counter()
    outcomes = asyncio.run(run_concurrent(server.url, specs, model, default_ratio, concurrency))
    duration = time.perf_counter() - start
    metrics_after = wait_idle(server)
    rss_after = server.rss_bytes()
    solo = asyncio.run(run_solo(server.url, specs, model, default_ratio))

    failures += [asdict(o) for o in outcomes if not o.ok]
    failures += [asdict(o) for o in solo.values() if not o.ok]
    mismatches = []
    for o in outcomes:
        ref = solo.get(o.index)
        if ref is None or not (o.ok and ref.ok):
            continue
        if (o.text, o.prompt_tokens) != (ref.text, ref.prompt_tokens):
            mismatches.append(
                {
                    "spec": asdict(specs[o.index]),
                    "concurrent": [o.text, o.prompt_tokens],
                    "solo": [ref.text, ref.prompt_tokens],
                }
            )
    latencies = [o.latency_s for o in outcomes if o.ok and not o.cancelled]
    mib = 1 << 20
    return SoakResult(
        requests=num_requests,
        concurrency=concurrency,
        completed=sum(1 for o in outcomes if o.ok and not o.cancelled),
        cancelled=sum(1 for o in outcomes if o.cancelled),
        failures=failures,
        mismatches=mismatches,
        latency_p50_s=statistics.median(latencies) if latencies else 0.0,
        latency_p99_s=percentile(latencies, 0.99),
        duration_s=duration,
        rss_before_mib=rss_before / mib,
        rss_after_mib=rss_after / mib,
        rss_growth_mib=(rss_after - rss_before) / mib,
        rss_growth_bound_mib=RSS_GROWTH_BASE_MIB + RSS_GROWTH_PER_REQUEST_MIB * num_requests,
        metrics_after=metrics_after,
        ratios=tuple(ratios),
        sizes=tuple(sizes),
    )


def summary(result: SoakResult) -> str:
    return (
        f"soak: {result.requests} requests, {result.concurrency} concurrent, "
        f"{result.completed} completed, {result.cancelled} cancelled mid-stream, "
        f"{len(result.failures)} failures, {len(result.mismatches)} mismatches vs solo\n"
        f"latency p50 {result.latency_p50_s:.2f}s p99 {result.latency_p99_s:.2f}s, "
        f"run {result.duration_s:.1f}s\n"
        f"RSS (server + engine + workers) {result.rss_before_mib:.0f} MiB -> "
        f"{result.rss_after_mib:.0f} MiB ({result.rss_growth_mib:+.1f} MiB, bound "
        f"{result.rss_growth_bound_mib:.0f})\n"
        f"after: running={result.metrics_after.get('vllm:num_requests_running')} "
        f"kv_cache_usage={result.metrics_after.get('vllm:kv_cache_usage_perc')}\n"
        f"{'PASS' if result.passed else 'FAIL'}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--warmup", type=int, default=None, help="default: max(2 x requests, 4 x concurrency)"
    )
    parser.add_argument("--cancel-fraction", type=float, default=0.1)
    parser.add_argument("--keep-ratio", type=float, default=0.25, help="server default")
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument(
        "--mode", choices=["input", "layer"], default="input", help="the server's --trio-mode"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, default=None, help="default: tiny local ckpt")
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = parser.parse_args(argv)

    import tempfile

    from trio_dev.checkpoints import build_checkpoint
    from trio_dev.local_server import vllm_server_process

    model = args.model or build_checkpoint(Path("artifacts") / "ckpt-tiny", preset="tiny", seed=0)
    server_args = [*SERVER_ARGS, "--trio-keep-ratio", str(args.keep_ratio),
                   "--trio-depth", str(args.depth), "--trio-mode", args.mode]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "soak_server.log"
        with vllm_server_process(model, server_args, log) as server:
            result = soak(
                server,
                args.requests,
                args.concurrency,
                args.keep_ratio,
                warmup_requests=args.warmup,
                seed=args.seed,
                cancel_fraction=args.cancel_fraction,
            )
            exit_code = server.stop()
            tracebacks = log.read_text().count("Traceback")
    report = {
        **asdict(result),
        "passed": result.passed,
        "server_exit_code": exit_code,
        "tracebacks_in_server_log": tracebacks,
        "model": str(model),
        "keep_ratio_default": args.keep_ratio,
        "depth": args.depth,
        "mode": args.mode,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(summary(result))
    print(f"saved {args.out}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
