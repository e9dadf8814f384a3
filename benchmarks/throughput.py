"""Throughput at saturation over HTTP on 127.0.0.1: stock vLLM vs ``--plugin trio``.

Starts ``vllm serve`` (stock, then ``--plugin trio``) on the bench checkpoint
and drives each with a bounded loopback load generator: ``--requests`` chat
requests with one image each, ``--concurrency`` in flight, fixed output length
(``ignore_eos``). TRIO runs at each keep ratio (per request, ``vllm_xargs``).
Reports requests/s, output tokens/s, mean prompt tokens, p50/p99 latency, and
how many such requests fit in the same KV cache (the server's KV blocks over
the blocks one request needs, from its prompt tokens and the block size).

    python benchmarks/throughput.py [--requests 24] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import time
from pathlib import Path

from common import ARTIFACTS, RATIOS, bench_checkpoint, chat_messages, save, scene, table
from openai import AsyncOpenAI

from trio_dev.local_server import vllm_server

KV_BYTES = 1 << 30
BLOCK_SIZE = 32


async def drive(url: str, ratio: float | None, n: int, concurrency: int, output_len: int) -> dict:
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    model = (await client.models.list()).data[0].id
    messages = chat_messages(scene(672, 672))
    extra = {"ignore_eos": True}
    if ratio is not None:
        extra["vllm_xargs"] = {"keep_ratio": ratio}
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    prompt_tokens: list[int] = []
    completion_tokens = 0

    async def one() -> None:
        nonlocal completion_tokens
        async with gate:
            start = time.perf_counter()
            out = await client.chat.completions.create(
                model=model, messages=messages, max_tokens=output_len, temperature=0,
                extra_body=extra,
            )  # fmt: skip
            latencies.append(time.perf_counter() - start)
            prompt_tokens.append(out.usage.prompt_tokens)
            completion_tokens += out.usage.completion_tokens

    await one()  # warm-up, not counted
    latencies.clear(), prompt_tokens.clear()
    completion_tokens = 0
    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    wall = time.perf_counter() - start
    latencies.sort()
    return dict(
        requests=n,
        wall_s=wall,
        req_per_s=n / wall,
        out_tok_per_s=completion_tokens / wall,
        prompt=statistics.mean(prompt_tokens),
        p50_s=latencies[len(latencies) // 2],
        p99_s=latencies[min(len(latencies) - 1, math.ceil(0.99 * len(latencies)) - 1)],
    )


def kv_capacity(prompt_tokens: float, output_len: int, num_blocks: int) -> int:
    per_request = math.ceil((prompt_tokens + output_len) / BLOCK_SIZE)
    return num_blocks // per_request


def server_blocks(log: Path) -> int:
    """KV cache size in tokens, from the server's own start-up line."""
    for line in log.read_text().splitlines():
        if "KV cache size:" in line:
            tokens = int(line.split("KV cache size:")[1].split("tokens")[0].replace(",", ""))
            return tokens // BLOCK_SIZE
    raise RuntimeError(f"no KV cache size in {log}")


COLUMNS = [
    ("engine", "engine", ""), ("ratio", "ratio", ".3f"), ("prompt", "prompt", ".0f"),
    ("req_per_s", "req/s", ".3f"), ("out_tok_per_s", "out tok/s", ".1f"),
    ("throughput_x", "thru x", ".2f"), ("p50_s", "p50 s", ".2f"), ("p99_s", "p99 s", ".2f"),
    ("kv_capacity", "fit in KV", "d"), ("capacity_x", "fit x", ".2f"),
]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--preset", default="bench", choices=["tiny", "bench"])
    args = ap.parse_args()
    ckpt = bench_checkpoint(args.preset)
    base_args = (
        "--max-model-len", "4096", "--kv-cache-memory-bytes", str(KV_BYTES),
        "--enforce-eager", "--block-size", str(BLOCK_SIZE), "--no-enable-prefix-caching",
        "--mm-processor-cache-gb", "0", "--max-num-seqs", str(args.concurrency),
    )  # fmt: skip
    rows = []
    ARTIFACTS.mkdir(exist_ok=True)
    for name, extra, ratios in (
        ("stock", [], [None]),
        ("trio", ["--plugin", "trio", "--trio-keep-ratio", "1.0"], list(RATIOS)),
    ):
        log = ARTIFACTS / f"throughput_{name}.log"
        with vllm_server(ckpt, extra, log, timeout_s=600, base_args=base_args) as url:
            blocks = server_blocks(log)
            for r in ratios:
                res = asyncio.run(drive(url, r, args.requests, args.concurrency, args.output_len))
                res.update(engine=name, ratio=1.0 if r is None else r)
                res["kv_capacity"] = kv_capacity(res["prompt"], args.output_len, blocks)
                rows.append(res)
                print(f"{name} ratio={res['ratio']}: {res['req_per_s']:.3f} req/s", flush=True)
    stock = rows[0]
    for row in rows:
        row["throughput_x"] = row["req_per_s"] / stock["req_per_s"]
        row["capacity_x"] = row["kv_capacity"] / stock["kv_capacity"]
    print(table(rows, COLUMNS))
    meta = vars(args) | {"kv_cache_bytes": KV_BYTES, "block_size": BLOCK_SIZE, "image": "672x672"}
    print(f"saved {save('throughput', {'meta': meta, 'rows': rows})}")


if __name__ == "__main__":
    main()
