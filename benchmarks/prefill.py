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

With ``--modes input,layer`` there is one TRIO engine per ``--trio-mode``; their
runs of one request are interleaved (``paired_median_times``), and
``vs_input`` is a mode's time over input mode's for the same request, in wall
time and in the process's CPU time (``cpu_vs_input``; the engines run in this
process, and CPU time is far less inflated by other jobs on a shared machine).

    python benchmarks/prefill.py [--preset bench] [--depth 2] [--repeats 3] [--tp 1]
        [--modes input,layer] [--ratios 1,0.333,0.222,0.111] [--concurrent 8]

With ``--concurrent C`` each pruned row also gets ``side_cC_s``/``side_cC_pct``:
the in-engine side pass per image when C copies of the request arrive
together (their images are encoded in one step and scored in one batched side
pass; each image's logged time is its share of the batch), and ``batch_cC``,
the largest batch the selection log recorded.

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
    paired_median_times,
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


def trio_times(
    trios: dict, req: dict, params: SamplingParams, repeats: int, side_pass: bool
) -> dict[str, tuple[float, float, float | None]]:
    """Per mode: median request wall and CPU time and (with ``side_pass``) median
    in-engine side pass."""
    side: dict[str, list[float]] = {mode: [] for mode in trios}

    def runner(mode: str):
        def run() -> None:
            trios[mode].generate(req, params, use_tqdm=False)
            if side_pass:
                rank0_log = trios[mode].apply_model(selection_log)[0]
                side[mode].append(rank0_log[-1].side_pass_s)

        return run

    totals = paired_median_times({mode: runner(mode) for mode in trios}, repeats)
    return {
        mode: (*totals[mode], statistics.median(side[mode][-repeats:]) if side_pass else None)
        for mode in trios
    }


def concurrent_side_pass(
    trio, req: dict, params: SamplingParams, copies: int, repeats: int
) -> tuple[float, int]:
    """Median in-engine side pass per image when ``copies`` of ``req`` arrive
    together, and the largest batched side pass the selection log recorded."""
    per_image, batch = [], 0
    for _ in range(repeats + 1):  # the first run warms up
        trio.generate([req] * copies, params, use_tqdm=False)
        log = trio.apply_model(selection_log)[0][-copies:]
        per_image.append(statistics.mean(rec.side_pass_s for rec in log))
        batch = max(batch, *(rec.batch_size for rec in log))
    return statistics.median(per_image[1:]), batch


COLUMNS = [
    ("engine", "engine", ""), ("mode", "mode", ""), ("image", "image", ""),
    ("ratio", "ratio", ".3f"),
    ("prompt", "prompt", "d"), ("blocks", "blocks", "d"), ("kv_x", "KV x", ".2f"),
    ("prefill_s", "prefill s", ".3f"), ("speedup", "speedup", ".2f"),
    ("e2e_s", "e2e s", ".3f"), ("e2e_speedup", "e2e x", ".2f"),
    ("side_s", "side s", ".3f"), ("side_pct", "side %", ".1f"),
    ("prefill_vs_input", "prefill vs input", ".3f"), ("e2e_vs_input", "e2e vs input", ".3f"),
    ("prefill_cpu_vs_input", "prefill cpu vs input", ".3f"),
    ("e2e_cpu_vs_input", "e2e cpu vs input", ".3f"),
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
    ap.add_argument("--modes", default="input", help="comma-separated --trio-mode values")
    ap.add_argument("--ratios", default=",".join(str(r) for r in RATIOS))
    ap.add_argument(
        "--concurrent", type=int, default=0, help="also time the side pass of C requests at once"
    )
    args = ap.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    modes = tuple(args.modes.split(","))
    ratios = [float(r) for r in args.ratios.split(",")]

    parallel = {}
    if args.tp > 1:
        for name, value in cpu_worker_env(args.tp).items():
            os.environ.setdefault(name, value)
        parallel = dict(tensor_parallel_size=args.tp, distributed_executor_backend="mp")
    ckpt = bench_checkpoint(args.preset)
    fam = family(args.preset)
    if fam == "qwen":
        parallel["limit_mm_per_prompt"] = {"image": 1, "video": 0}
    stock, trios = offline_engines(ckpt, args.depth, args.block_size, modes, **parallel)
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
        for r in ratios:
            req = offline_request(image, r, fam)
            prefill = trio_times(trios, req, first, args.repeats, side_pass=r < 1.0)
            full = trio_times(trios, req, e2e, args.repeats, side_pass=False)
            for mode, trio in trios.items():
                kv = measure_prompt_kv(trio, req, f"trio-kv-{mode}-{r}")
                row = dict(
                    engine="trio", mode=mode, image=base["image"], ratio=r,
                    prompt=kv.prompt_tokens, blocks=kv.kv_blocks,
                    prefill_s=prefill[mode][0], e2e_s=full[mode][0],
                    prefill_vs_input=prefill[mode][0] / prefill[modes[0]][0],
                    e2e_vs_input=full[mode][0] / full[modes[0]][0],
                    prefill_cpu_s=prefill[mode][1], e2e_cpu_s=full[mode][1],
                    prefill_cpu_vs_input=prefill[mode][1] / prefill[modes[0]][1],
                    e2e_cpu_vs_input=full[mode][1] / full[modes[0]][1],
                )  # fmt: skip
                if r < 1.0:
                    row["side_s"] = prefill[mode][2]
                    row["side_pct"] = 100 * row["side_s"] / base["prefill_s"]
                if r < 1.0 and args.concurrent:
                    c = args.concurrent
                    side, batch = concurrent_side_pass(trio, req, first, c, args.repeats)
                    row[f"side_c{c}_s"], row[f"batch_c{c}"] = side, batch
                    row[f"side_c{c}_pct"] = 100 * side / base["prefill_s"]
                rows.append(row)
        for row in rows[-1 - len(ratios) * len(modes) :]:
            row["kv_x"] = base["blocks"] / row["blocks"]
            row["speedup"] = base["prefill_s"] / row["prefill_s"]
            row["e2e_speedup"] = base["e2e_s"] / row["e2e_s"]

    model_config = stock.llm_engine.vllm_config.model_config
    meta = dict(
        preset=args.preset,
        depth=args.depth,
        repeats=args.repeats,
        output_len=args.output_len,
        block_size=args.block_size,
        tensor_parallel_size=args.tp,
        modes=list(modes),
        concurrent=args.concurrent,
        num_layers=model_config.hf_config.get_text_config().num_hidden_layers,
        dtype=str(model_config.dtype),
    )
    print(" ".join(f"{k}={v}" for k, v in meta.items()))
    columns = COLUMNS
    if args.concurrent:
        c = args.concurrent
        columns = [
            *COLUMNS,
            (f"side_c{c}_s", f"side s x{c}", ".3f"),
            (f"side_c{c}_pct", f"side % x{c}", ".1f"),
            (f"batch_c{c}", "batch", "d"),
        ]
    print(table(rows, columns))
    name = "prefill" if args.tp == 1 else f"prefill_tp{args.tp}"
    if fam == "qwen":
        name += f"_{args.preset}"
    if modes != ("input",):
        name += "_" + "_".join(modes)
    if args.concurrent:
        name += f"_concurrent{args.concurrent}"
    print(f"saved {save(name, {'meta': meta, 'rows': rows})}")


if __name__ == "__main__":
    main()
