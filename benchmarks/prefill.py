"""Prefill, end-to-end latency and KV cache per request: stock vLLM vs ``--plugin trio``.

One process, two in-process engines on the same locally built checkpoint with
identical settings (caches off, so every run encodes and prefills from
scratch): stock vLLM LLaVA-NeXT, and TRIO via ``vllm_trio.engine_kwargs``. For
one image request per image size (anyres grids) and keep ratio it reports:

* ``prompt``/``blocks``: prompt tokens and the KV blocks vLLM's scheduler gave
  the request (``trio_dev.accounting``), and ``kv_x``, stock blocks / blocks;
* ``prefill_s``: median wall time of the request with ``max_tokens=1``
  (processing, vision encoder, side pass, prefill, one sample), ``speedup``
  against stock for the same image;
* ``e2e_s``: median wall time with ``--output-len`` generated tokens;
* ``side_s``/``side_pct``: the in-engine side pass of that request (from the
  model's selection log) and its share of stock prefill.

    python benchmarks/prefill.py [--preset bench] [--depth 2] [--repeats 3] [--tp 1]

``--preset qwen-bench`` runs the same on a Qwen2.5-VL-7B-shaped checkpoint
(results in ``prefill_qwen-bench.json``).

With ``--tp N`` both engines run N tensor-parallel workers (every rank runs
the side pass on its shards) and the results go to ``prefill_tpN.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics

from common import (
    IMAGE_SIZES,
    RATIOS,
    bench_checkpoint,
    family,
    median_time,
    offline_engines,
    offline_request,
    save,
    scene,
    table,
)
from vllm import SamplingParams

import vllm_trio
from trio_dev.accounting import measure_prompt_kv
from trio_dev.local_server import cpu_worker_env
from vllm_trio.binding.model import selection_log


def timed_generate(llm, req: dict, params: SamplingParams, repeats: int) -> float:
    return median_time(lambda: llm.generate(req, params, use_tqdm=False), repeats)


def trio_prefill(trio, req: dict, params: SamplingParams, repeats: int) -> tuple[float, float]:
    """Median request time and median in-engine side-pass time."""
    side: list[float] = []

    def run() -> None:
        trio.generate(req, params, use_tqdm=False)
        rank0_log = trio.apply_model(selection_log)[0]
        side.append(rank0_log[-1].side_pass_s)

    total = median_time(run, repeats)
    return total, statistics.median(side[-repeats:])


COLUMNS = [
    ("engine", "engine", ""), ("image", "image", ""), ("ratio", "ratio", ".3f"),
    ("prompt", "prompt", "d"), ("blocks", "blocks", "d"), ("kv_x", "KV x", ".2f"),
    ("prefill_s", "prefill s", ".3f"), ("speedup", "speedup", ".2f"),
    ("e2e_s", "e2e s", ".3f"), ("e2e_speedup", "e2e x", ".2f"),
    ("side_s", "side s", ".3f"), ("side_pct", "side %", ".1f"),
]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--preset", default="bench", choices=["tiny", "bench", "qwen-tiny", "qwen-bench"]
    )
    ap.add_argument("--depth", type=int, default=vllm_trio.config.DEFAULT_DEPTH)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--sizes", default=",".join(f"{w}x{h}" for w, h in IMAGE_SIZES))
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel workers per engine")
    args = ap.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]

    parallel = {}
    if args.tp > 1:
        for name, value in cpu_worker_env(args.tp).items():
            os.environ.setdefault(name, value)
        parallel = dict(tensor_parallel_size=args.tp, distributed_executor_backend="mp")
    ckpt = bench_checkpoint(args.preset)
    fam = family(args.preset)
    if fam == "qwen":
        parallel["limit_mm_per_prompt"] = {"image": 1, "video": 0}
    stock, trio = offline_engines(ckpt, args.depth, args.block_size, **parallel)
    first = SamplingParams(max_tokens=1, temperature=0)
    e2e = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)

    rows = []
    for width, height in sizes:
        image = scene(width, height)
        base_req = offline_request(image, None, fam)
        base_kv = measure_prompt_kv(stock, base_req, "stock-kv")
        base = dict(
            engine="stock",
            image=f"{width}x{height}",
            ratio=1.0,
            prompt=base_kv.prompt_tokens,
            blocks=base_kv.kv_blocks,
            prefill_s=timed_generate(stock, base_req, first, args.repeats),
            e2e_s=timed_generate(stock, base_req, e2e, args.repeats),
        )
        rows.append(base)
        for r in RATIOS:
            req = offline_request(image, r, fam)
            kv = measure_prompt_kv(trio, req, f"trio-kv-{r}")
            row = dict(
                engine="trio", image=base["image"], ratio=r, prompt=kv.prompt_tokens,
                blocks=kv.kv_blocks, e2e_s=timed_generate(trio, req, e2e, args.repeats),
            )  # fmt: skip
            if r < 1.0:
                row["prefill_s"], row["side_s"] = trio_prefill(trio, req, first, args.repeats)
                row["side_pct"] = 100 * row["side_s"] / base["prefill_s"]
            else:
                row["prefill_s"] = timed_generate(trio, req, first, args.repeats)
            rows.append(row)
        for row in rows[-1 - len(RATIOS) :]:
            row["kv_x"] = base["blocks"] / row["blocks"]
            row["speedup"] = base["prefill_s"] / row["prefill_s"]
            row["e2e_speedup"] = base["e2e_s"] / row["e2e_s"]

    model_config = trio.llm_engine.vllm_config.model_config
    meta = dict(
        preset=args.preset,
        depth=args.depth,
        repeats=args.repeats,
        output_len=args.output_len,
        block_size=args.block_size,
        tensor_parallel_size=args.tp,
        num_layers=model_config.hf_config.get_text_config().num_hidden_layers,
        dtype=str(model_config.dtype),
    )
    print(" ".join(f"{k}={v}" for k, v in meta.items()))
    print(table(rows, COLUMNS))
    name = "prefill" if args.tp == 1 else f"prefill_tp{args.tp}"
    if fam == "qwen":
        name += f"_{args.preset}"
    print(f"saved {save(name, {'meta': meta, 'rows': rows})}")


if __name__ == "__main__":
    main()
