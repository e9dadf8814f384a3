"""Core-algorithm timings in pure PyTorch at LLaVA-NeXT shapes (CPU or GPU).

Random weights (speed only). For a prompt of ``--text`` tokens plus ``N``
visual tokens it times, side by side in one run:

* the TRIO side pass at each ``--depths`` (layers 0..L-1 forward over the
  unpruned prompt, layer L at the loss rows, input gradient, NMS to k);
* NMS alone;
* an unpruned prefill (all layers over text + N) and pruned prefills (text +
  k) with the same plain layer, i.e. the language model's share of prefill.

This is the script to run on a lent GPU (``--shape 7b --device cuda --dtype
bfloat16``): nothing vLLM-specific is needed there.

With ``--batch-sizes 1 2 4 8`` it times instead the side pass per image when B
prompts of the same shape are scored in one batched pass (``core.batch``, as
the binding does for images encoded in one step; B = 1 is the single-prompt
path), next to the unpruned prefill, and saves
``core_speed_batch_<shape>_<device>_<dtype>_N<visual>.json``.

    python benchmarks/core_speed.py [--shape bench|7b] [--device cpu|cuda] [--threads 1]
        [--batch-sizes 1 2 4 8 --depths 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from common import RATIOS, save, table

from vllm_trio.core import (
    LlamaLayerWeights,
    Rotary,
    decoder_layer,
    nms_select,
    num_kept_tokens,
    pad_rows,
    rms_norm,
    select_visual_tokens,
    select_visual_tokens_batch,
)

SHAPES = {
    # hidden, layers, heads, kv heads, intermediate, vocab
    "bench": (512, 32, 8, 8, 1376, 1024),
    "7b": (4096, 32, 32, 32, 11008, 32064),
}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shape", default="bench", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--visual", type=int, default=2928)
    ap.add_argument("--text", type=int, default=60)
    ap.add_argument("--depths", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    d, num_layers, heads, kv_heads, inter, vocab = SHAPES[args.shape]
    dev, dt = args.device, getattr(torch, args.dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(dev, dt)

    hd = d // heads
    layers = [
        LlamaLayerWeights(
            input_norm=torch.ones(d, device=dev, dtype=dt),
            post_norm=torch.ones(d, device=dev, dtype=dt),
            eps=1e-5,
            qkv=rand((heads + 2 * kv_heads) * hd, d),
            o_proj=rand(d, d),
            gate_up=rand(2 * inter, d),
            down=rand(d, inter),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=hd,
        )
        for _ in range(num_layers)
    ]
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.arange(8192).float()[:, None] * inv[None]
    rotary = Rotary(torch.cat([freqs.cos(), freqs.sin()], -1).to(dev))
    head = rand(vocab, d)
    norm = torch.ones(d, device=dev, dtype=dt)
    seq = args.text + args.visual
    embeds = (torch.randn(seq, d, generator=gen)).to(dev, dt)
    visual = torch.arange(args.text // 2, args.text // 2 + args.visual, device=dev)

    def prefill(length: int) -> None:
        pos = torch.arange(length, device=dev)
        with torch.inference_mode():
            h = embeds[:length]
            for w in layers:
                h = decoder_layer(h, w, rotary, pos)
            F.linear(rms_norm(h[-1:], norm, 1e-5), head)

    def side_pass(depth: int, k: int) -> None:
        pos = torch.arange(seq, device=dev)
        with torch.inference_mode():
            h = embeds
            for w in layers[:depth]:
                h = decoder_layer(h, w, rotary, pos)
            select_visual_tokens(
                h, visual, k,
                lambda x, q: decoder_layer(x, layers[depth], rotary, pos, q),
                lambda x: rms_norm(x, norm, 1e-5), lambda x: F.linear(x, head),
            )  # fmt: skip

    def side_pass_batch(depth: int, k: int, batch: int) -> None:
        prompts = [embeds] + [embeds + 0.1 * torch.randn_like(embeds) for _ in range(batch - 1)]
        pos = pad_rows([torch.arange(seq, device=dev)] * batch)
        with torch.inference_mode():
            h = pad_rows(prompts)
            for w in layers[:depth]:
                h = decoder_layer(h, w, rotary, pos)
            select_visual_tokens_batch(
                h, [seq] * batch, [visual] * batch, [k] * batch,
                lambda x, q: decoder_layer(x, layers[depth], rotary, pos, q),
                lambda x: rms_norm(x, norm, 1e-5), lambda x: F.linear(x, head),
            )  # fmt: skip

    full = timed(lambda: prefill(seq), dev, args.repeats)
    rows = [dict(what="prefill", ratio=1.0, tokens=seq, seconds=full, pct=100.0)]
    if args.batch_sizes:
        batch_mode(args, rows, full, side_pass, side_pass_batch, num_layers)
        return
    for r in RATIOS[1:]:
        k = num_kept_tokens(args.visual, r)
        t = timed(lambda k=k: prefill(args.text + k), dev, args.repeats)
        rows.append(
            dict(what="prefill", ratio=r, tokens=args.text + k, seconds=t, pct=100 * t / full)
        )
    k111 = num_kept_tokens(args.visual, 0.111)
    feats = embeds[visual]
    scores = torch.rand(args.visual, generator=gen).to(dev)
    t = timed(lambda: nms_select(feats, scores, k111), dev, args.repeats)
    rows.append(dict(what="nms", ratio=0.111, tokens=args.visual, seconds=t, pct=100 * t / full))
    for depth in args.depths:
        t = timed(lambda depth=depth: side_pass(depth, k111), dev, args.repeats)
        rows.append(
            dict(what=f"side pass L={depth}", ratio=0.111, tokens=seq, seconds=t,
                 pct=100 * t / full, target_pct=100 * (depth + 0.5) / num_layers)
        )  # fmt: skip
    device_name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"shape={args.shape} device={device_name} dtype={args.dtype} N={args.visual}")
    cols = [
        ("what", "what", ""), ("ratio", "ratio", ".3f"), ("tokens", "tokens", "d"),
        ("seconds", "seconds", ".4f"), ("pct", "% of prefill", ".1f"),
        ("target_pct", "(L+.5)/layers %", ".1f"),
    ]  # fmt: skip
    print(table(rows, cols))
    name = f"core_speed_{args.shape}_{dev}"
    print(f"saved {save(name, {'meta': vars(args) | {'device_name': device_name}, 'rows': rows})}")


def batch_mode(args, rows: list[dict], full: float, side_pass, side_pass_batch, num_layers: int):
    """Per-image side pass at each batch size, against the B = 1 path and the prefill.

    The batch sizes are interleaved in every repeat, so drift in a shared
    machine's load hits them alike; CPU time (this process's, one thread) is
    reported next to wall time because other jobs inflate it far less.
    """
    k111 = num_kept_tokens(args.visual, 0.111)
    for depth in args.depths:
        runs = {
            batch: (lambda d=depth: side_pass(d, k111))
            if batch == 1
            else (lambda d=depth, b=batch: side_pass_batch(d, k111, b))
            for batch in args.batch_sizes
        }
        times: dict[int, list[tuple[float, float]]] = {b: [] for b in runs}
        for fn in runs.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for batch, fn in runs.items():
                wall, cpu = time.perf_counter(), time.process_time()
                fn()
                sync(args.device)
                times[batch].append((time.perf_counter() - wall, time.process_time() - cpu))
        single = None
        for batch, t in times.items():
            wall = statistics.median(w for w, _ in t) / batch
            cpu = statistics.median(c for _, c in t) / batch
            single = single or (wall, cpu)
            rows.append(
                dict(what=f"side pass L={depth}", batch=batch, tokens=args.text + args.visual,
                     seconds=wall, cpu_seconds=cpu, pct=100 * wall / full,
                     target_pct=100 * (depth + 0.5) / num_layers,
                     speedup=single[0] / wall, cpu_speedup=single[1] / cpu)
            )  # fmt: skip
    print(
        f"shape={args.shape} device={args.device} dtype={args.dtype} N={args.visual} "
        f"threads={args.threads}; side pass seconds are per image"
    )
    cols = [
        ("what", "what", ""), ("batch", "B", "d"), ("tokens", "tokens", "d"),
        ("seconds", "s/image", ".4f"), ("cpu_seconds", "cpu s/image", ".4f"),
        ("pct", "% of prefill", ".1f"), ("target_pct", "(L+.5)/layers %", ".1f"),
        ("speedup", "x vs B=1", ".2f"), ("cpu_speedup", "cpu x vs B=1", ".2f"),
    ]  # fmt: skip
    print(table(rows, cols))
    name = f"core_speed_batch_{args.shape}_{args.device}_{args.dtype}_N{args.visual}"
    print(f"saved {save(name, {'meta': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
