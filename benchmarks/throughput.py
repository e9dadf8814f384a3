"""Serving throughput and latency under load, measured by vLLM's own ``vllm bench serve``.

Starts ``vllm serve`` on 127.0.0.1 (stock, then ``--plugin trio``) on the bench
checkpoint and loads each with vLLM's load generator, as a user would::

    vllm bench serve --backend openai-chat --endpoint /v1/chat/completions \\
        --dataset-name random-mm --max-concurrency C --ignore-eos \\
        --extra-body '{"vllm_xargs": {"keep_ratio": r}}' ...

Every request is one random 672x672 image (2,928 visual tokens on the bench
model) and ``--input-len`` random text tokens, generating ``--output-len``
tokens. TRIO runs at each keep ratio, per request. Per run: request
throughput, output tokens/s, TTFT, ITL and end-to-end latency (p50/p99) as
vLLM prints them (its output is kept in ``artifacts/bench_serve/``), the
prompt tokens the server counted (``vllm:prompt_tokens_total``: vLLM's
client counts only the text), and how many such requests the KV cache holds
at once. ``--preset qwen-bench`` runs the same on the Qwen2.5-VL-7B-shaped
checkpoint (609 visual tokens per 672x672 image; ``throughput_qwen-bench.json``).
``--mode compiled`` runs vLLM's default compiled mode (no
``--enforce-eager``) instead, ``--mode both`` both.

    python benchmarks/throughput.py [--concurrency 8 32] [--ratios 1 0.333 0.111] [--mode eager]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests
from common import ARTIFACTS, RESULTS, bench_checkpoint, save, table

from trio_dev.local_server import parse_metrics, vllm_server

#: The servers compared: stock, and TRIO in each ``--trio-modes`` mode (named
#: ``trio`` for input mode, ``trio-layer`` for layer mode); TRIO's ratio comes
#: with each request.
TRIO_ARGS = ["--plugin", "trio", "--trio-keep-ratio", "1.0"]


def servers(trio_modes: list[str]) -> dict[str, list[str]]:
    named = {"input": "trio", "layer": "trio-layer"}
    return {"stock": []} | {named[m]: [*TRIO_ARGS, "--trio-mode", m] for m in trio_modes}


KV_BYTES = 1 << 30
BLOCK_SIZE = 32
IMAGE = (672, 672)


def server_blocks(log: Path) -> int:
    """KV cache size in blocks, from the server's own start-up line."""
    for line in log.read_text().splitlines():
        if "KV cache size:" in line:
            tokens = int(line.split("KV cache size:")[1].split("tokens")[0].replace(",", ""))
            return tokens // BLOCK_SIZE
    raise RuntimeError(f"no KV cache size in {log}")


def bench_serve(
    url: str, ckpt: Path, ratio: float | None, concurrency: int, args: argparse.Namespace, tag: str
) -> dict[str, Any]:
    """One ``vllm bench serve`` run; its saved JSON plus the server-side prompt tokens."""
    out_dir = ARTIFACTS / "bench_serve"
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(Path(sys.executable).with_name("vllm")), "bench", "serve",
        "--backend", "openai-chat", "--base-url", url, "--endpoint", "/v1/chat/completions",
        "--tokenizer", str(ckpt), "--dataset-name", "random-mm", "--seed", "0",
        "--num-prompts", str(args.prompts_per_slot * concurrency),
        "--max-concurrency", str(concurrency), "--request-rate", "inf",
        "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
        "--random-range-ratio", "0", "--random-mm-base-items-per-request", "1",
        "--random-mm-num-mm-items-range-ratio", "0",
        "--random-mm-limit-mm-per-prompt", '{"image": 1, "video": 0}',
        "--random-mm-bucket-config", f"{{({IMAGE[1]}, {IMAGE[0]}, 1): 1.0}}",
        "--ignore-eos", "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(out_dir), "--result-filename", f"{tag}.json",
    ]  # fmt: skip
    if ratio is not None:
        cmd += ["--extra-body", json.dumps({"vllm_xargs": {"keep_ratio": ratio}})]
    before = parse_metrics(requests.get(f"{url}/metrics", timeout=30).text)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (out_dir / f"{tag}.log").write_text(" ".join(cmd) + "\n\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({tag}):\n{proc.stdout[-3000:]}{proc.stderr}")
    after = parse_metrics(requests.get(f"{url}/metrics", timeout=30).text)
    res = json.loads((out_dir / f"{tag}.json").read_text())
    served = after["vllm:request_success_total"] - before["vllm:request_success_total"]
    prompt = after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"]
    keep = (
        "duration", "completed", "failed", "request_throughput", "output_throughput",
        "max_concurrent_requests", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms",
        "p99_itl_ms", "median_tpot_ms", "p99_tpot_ms", "median_e2el_ms", "p99_e2el_ms",
    )  # fmt: skip
    row = {k: res[k] for k in keep}
    # The initial test request that vllm bench serve sends is counted too.
    row["prompt"] = prompt / served
    return row


def kv_capacity(prompt_tokens: float, output_len: int, num_blocks: int) -> int:
    return num_blocks // math.ceil((prompt_tokens + output_len) / BLOCK_SIZE)


COLUMNS = [
    ("mode", "mode", ""), ("concurrency", "conc", "d"), ("engine", "engine", ""),
    ("ratio", "ratio", ".3f"), ("prompt", "prompt", ".0f"),
    ("request_throughput", "req/s", ".3f"), ("throughput_x", "thru x", ".2f"),
    ("output_throughput", "out tok/s", ".1f"),
    ("median_ttft_ms", "TTFT p50", ".0f"), ("p99_ttft_ms", "TTFT p99", ".0f"),
    ("median_itl_ms", "ITL p50", ".0f"), ("p99_itl_ms", "ITL p99", ".0f"),
    ("p99_e2el_ms", "E2E p99", ".0f"), ("kv_capacity", "fit in KV", "d"),
]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.333, 0.111])
    ap.add_argument(
        "--prompts-per-slot", type=int, default=2, help="requests per run = this x concurrency"
    )
    ap.add_argument("--input-len", type=int, default=32, help="random text tokens per request")
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument(
        "--mode",
        choices=["eager", "compiled", "both"],
        default="eager",
        help="--enforce-eager, vLLM's default compiled mode, or both (compiled at the last "
        "concurrency only)",
    )
    ap.add_argument(
        "--trio-modes",
        nargs="+",
        choices=["input", "layer"],
        default=["input"],
        help="one TRIO server per --trio-mode, side by side",
    )
    ap.add_argument("--name", help="results file stem (default: throughput[_PRESET])")
    ap.add_argument(
        "--preset", default="bench", choices=["tiny", "bench", "qwen-tiny", "qwen-bench"]
    )
    args = ap.parse_args()
    if args.name is None:
        args.name = "throughput" if args.preset == "bench" else f"throughput_{args.preset}"
    ckpt = bench_checkpoint(args.preset)
    common = (
        "--max-model-len", "4096", "--kv-cache-memory-bytes", str(KV_BYTES),
        "--block-size", str(BLOCK_SIZE), "--no-enable-prefix-caching",
        "--mm-processor-cache-gb", "0", "--max-num-seqs", str(max(args.concurrency)),
    )  # fmt: skip
    modes = []
    if args.mode in ("eager", "both"):
        modes.append(("eager", ("--enforce-eager",), args.concurrency))
    if args.mode in ("compiled", "both"):
        modes.append(
            ("compiled", (), args.concurrency[-1:] if args.mode == "both" else args.concurrency)
        )
    rows: list[dict[str, Any]] = []
    path = RESULTS / f"{args.name}.json"
    ARTIFACTS.mkdir(exist_ok=True)
    start = time.monotonic()
    load_start = os.getloadavg()
    for mode, mode_args, concurrencies in modes:
        # Both servers up at once, each run of one right after the other's at
        # the same concurrency: load from others on this shared machine then
        # drifts less between the two sides of a comparison.
        with contextlib.ExitStack() as stack:
            urls, blocks = {}, {}
            for engine, extra in servers(args.trio_modes).items():
                log = ARTIFACTS / f"throughput_{mode}_{engine}.log"
                base = (*common, *mode_args)
                server = vllm_server(ckpt, extra, log, timeout_s=1200, base_args=base)
                urls[engine] = stack.enter_context(server)
                blocks[engine] = server_blocks(log)
            for c in concurrencies:
                trio = [e for e in urls if e != "stock"]
                for engine, r in [("stock", None)] + [(e, r) for r in args.ratios for e in trio]:
                    tag = f"{mode}_{engine}_c{c}" + ("" if r is None else f"_r{r}")
                    row = bench_serve(urls[engine], ckpt, r, c, args, tag)
                    row.update(mode=mode, concurrency=c, engine=engine)
                    row["ratio"] = 1.0 if r is None else r
                    row["kv_capacity"] = kv_capacity(row["prompt"], args.output_len, blocks[engine])
                    rows.append(row)
                    print(
                        f"[{time.monotonic() - start:6.0f} s] {tag}: "
                        f"{row['request_throughput']:.3f} req/s",
                        flush=True,
                    )
                    # Saved after every run: a long run stopped early keeps what it measured.
                    path = save_rows(rows, args, start, load_start)
    print(table(rows, COLUMNS))
    print(f"saved {path}")


def save_rows(
    rows: list[dict[str, Any]], args: argparse.Namespace, start: float, load_start: tuple
) -> Path:
    stock = {(s["mode"], s["concurrency"]): s for s in rows if s["engine"] == "stock"}
    for row in rows:
        ref = stock[row["mode"], row["concurrency"]]
        row["throughput_x"] = row["request_throughput"] / ref["request_throughput"]
    meta = vars(args) | {
        "kv_cache_bytes": KV_BYTES, "block_size": BLOCK_SIZE, "image": f"{IMAGE[0]}x{IMAGE[1]}",
        "load_generator": "vllm bench serve (openai-chat, random-mm)",
        "wall_s": time.monotonic() - start,
        # The machine is shared: other work slows both servers, not alike.
        "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
        "cpus": os.cpu_count(),
    }  # fmt: skip
    return save(args.name, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
