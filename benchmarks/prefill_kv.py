"""Prompt tokens, KV blocks, prefill time and the side pass's share, TRIO vs stock vLLM.

One process, two in-process engines on the same locally built checkpoint:
stock vLLM LLaVA-NeXT and ``--plugin trio`` (via ``vllm_trio.engine_kwargs``).
For one image request at each keep ratio it reports vLLM's own accounting
(prompt tokens, KV blocks allocated to the request) and timings measured side
by side (median of ``--repeats``; caches off so every run encodes and
prefills from scratch):

* ``prefill_s``: wall time of a request with ``max_tokens=1`` (processing,
  vision encoder, side pass, prefill, one sample);
* ``side_pass_s``: the in-engine side pass of that request (context build,
  layers 0..L, proxy-loss gradient, NMS), from the model's selection log;
* ``side_share``: ``side_pass_s`` over the stock engine's ``prefill_s``.

    python benchmarks/prefill_kv.py [--preset bench] [--size 672] [--depth 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from PIL import Image, ImageDraw
from vllm import LLM, SamplingParams

import vllm_trio
from vllm_trio.accounting import measure_prompt_kv
from vllm_trio.checkpoints import build_checkpoint

RATIOS = (1.0, 0.333, 0.222, 0.111)


def scene(width: int, height: int) -> Image.Image:
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.ellipse([width // 8, height // 3, width // 3, 2 * height // 3], fill="red")
    d.rectangle([5 * width // 8, height // 3, 7 * width // 8, 2 * height // 3], fill="blue")
    d.text((width // 2, height // 8), "TRIO 42", fill="black")
    return img


def request(image: Image.Image, ratio: float | None) -> dict:
    req = {
        "prompt": "USER: <image>\nWhat colour is the circle? ASSISTANT:",
        "multi_modal_data": {"image": image},
    }
    if ratio is not None:
        req["mm_processor_kwargs"] = {"trio_keep_ratio": ratio}
    return req


def timed(llm: LLM, req: dict, repeats: int) -> float:
    params = SamplingParams(max_tokens=1, temperature=0)
    llm.generate(req, params, use_tqdm=False)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        llm.generate(req, params, use_tqdm=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def side_pass_time(llm: LLM, req: dict, repeats: int) -> float:
    params = SamplingParams(max_tokens=1, temperature=0)
    times = []
    for _ in range(repeats):
        llm.generate(req, params, use_tqdm=False)
        [t] = llm.apply_model(lambda m: m.trio_selection_log[-1].side_pass_s)
        times.append(t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", default="bench", choices=["tiny", "bench"])
    ap.add_argument("--size", type=int, nargs=2, default=[672, 672], metavar=("W", "H"))
    ap.add_argument("--depth", type=int, default=vllm_trio.config.DEFAULT_DEPTH)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "prefill_kv.json"
    )
    args = ap.parse_args()

    ckpt = build_checkpoint(Path("artifacts") / f"ckpt-{args.preset}", preset=args.preset)
    common = dict(
        model=str(ckpt),
        max_model_len=4096,
        enforce_eager=True,
        kv_cache_memory_bytes=1 << 30,
        enable_prefix_caching=False,
        mm_processor_cache_gb=0,
        block_size=args.block_size,
        max_num_batched_tokens=4096,
        seed=0,
    )
    stock = LLM(**common)
    trio = LLM(**common, **vllm_trio.engine_kwargs(keep_ratio=1.0, depth=args.depth))
    image = scene(*args.size)

    stock_kv = measure_prompt_kv(stock, request(image, None), "stock-kv")
    stock_prefill = timed(stock, request(image, None), args.repeats)
    rows = [{"engine": "stock", "keep_ratio": 1.0, **stock_kv.__dict__, "prefill_s": stock_prefill}]
    for r in RATIOS:
        req = request(image, r)
        kv = measure_prompt_kv(trio, req, f"trio-kv-{r}")
        row = {
            "engine": "trio",
            "keep_ratio": r,
            **kv.__dict__,
            "prefill_s": timed(trio, req, args.repeats),
        }
        if r < 1.0:
            row["side_pass_s"] = side_pass_time(trio, req, args.repeats)
            row["side_share"] = row["side_pass_s"] / stock_prefill
        rows.append(row)

    num_layers = trio.llm_engine.vllm_config.model_config.hf_config.text_config.num_hidden_layers
    print(f"preset={args.preset} image={args.size[0]}x{args.size[1]} depth={args.depth} "
          f"layers={num_layers} block_size={args.block_size}")  # fmt: skip
    header = f"{'engine':<6} {'ratio':>6} {'prompt':>7} {'blocks':>6} {'KV x':>6} {'prefill s':>9} {'speed-up':>8} {'side s':>7} {'side %':>7}"  # noqa: E501
    print(header)
    for row in rows:
        kv_x = stock_kv.kv_blocks / row["kv_blocks"]
        speed = stock_prefill / row["prefill_s"]
        side = (
            f"{row['side_pass_s']:7.3f} {100 * row['side_share']:6.1f}%"
            if "side_pass_s" in row
            else f"{'-':>7} {'-':>7}"
        )
        print(
            f"{row['engine']:<6} {row['keep_ratio']:>6} {row['prompt_tokens']:>7} "
            f"{row['kv_blocks']:>6} {kv_x:>6.2f} {row['prefill_s']:>9.3f} {speed:>8.2f} {side}"
        )
        row.update(kv_reduction=kv_x, prefill_speedup=speed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "preset": args.preset,
        "image": args.size,
        "depth": args.depth,
        "num_layers": num_layers,
        "block_size": args.block_size,
        "repeats": args.repeats,
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
