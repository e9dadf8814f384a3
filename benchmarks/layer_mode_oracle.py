"""How close vLLM's first token is to the paper's in-LLM pruning, in each ``--trio-mode``.

For single-image prompts on the tiny checkpoint (float32, random weights), the
next-token log-probabilities after the prompt, over the whole vocabulary, from
a vLLM engine per mode (compiled as vLLM compiles by default unless
``--eager``; prefix caching on, ``--chunk``-token prefill chunks so that images
span steps) against ``trio_dev.reference.prune_forward_hf`` pruning inside the
LLM at the same depth. Prints the maximum absolute difference per prompt and
mode and saves ``benchmarks/results/layer_mode_oracle.json``.

    python benchmarks/layer_mode_oracle.py [--depth 1] [--chunk 32] [--eager]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch
from common import save, table
from transformers import AutoProcessor, LlavaNextForConditionalGeneration
from vllm import LLM, SamplingParams

import vllm_trio
from trio_dev.checkpoints import build_checkpoint
from trio_dev.reference import prune_forward_hf
from vllm_trio.core import Schedule, num_kept_tokens

QUESTIONS = ("which shape is red?", "is there a circle on the left?", "count the squares")
PREAMBLE = "here is a picture of a small red circle next to a big blue square, look closely"


def image(seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    base = rng.randint(0, 255, size=(4, 4, 3)).astype(np.float32)
    img = np.kron(base, np.ones((29, 29, 1)))[:112, :112]
    return Image.fromarray(np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8))


def prompts() -> list[str]:
    short = [f"USER: <image>\n{q} ASSISTANT:" for q in QUESTIONS]
    return [*short, f"USER: {PREAMBLE} <image>\n{QUESTIONS[0]} ASSISTANT:"]


def reference(model, processor, prompt: str, img, ratio: float, depth: int) -> torch.Tensor:
    enc = processor(images=img, text=prompt, return_tensors="pt")
    ids = enc["input_ids"][0]
    k = num_kept_tokens(int((ids == model.config.image_token_index).sum()), ratio)
    ref = prune_forward_hf(
        model, ids, enc["pixel_values"], enc["image_sizes"], Schedule.single(depth, k)
    )
    return torch.log_softmax(ref.logits_last.float(), dim=-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=32, help="max_num_batched_tokens")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (default: compiled)")
    ap.add_argument("--ratios", default="0.5,0.222,0.111")
    args = ap.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(Path(tmp) / "tiny", preset="tiny", seed=0)
        model = LlavaNextForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(ckpt)
        first = SamplingParams(temperature=0, max_tokens=1, logprobs=-1)
        cases = [(p, image(11 + i), r) for i, p in enumerate(prompts()) for r in ratios]
        want = {
            (p, r): reference(model.eval(), processor, p, im, r, args.depth) for p, im, r in cases
        }
        rows = []
        for mode in ("input", "layer"):
            llm = LLM(
                model=str(ckpt),
                dtype="float32",
                enforce_eager=args.eager,
                max_model_len=2048,
                kv_cache_memory_bytes=64 << 20,
                enable_prefix_caching=True,
                enable_chunked_prefill=True,
                max_num_batched_tokens=args.chunk,
                max_logprobs=-1,
                seed=0,
                **vllm_trio.engine_kwargs(keep_ratio=0.25, depth=args.depth, mode=mode),
            )
            for p, im, r in cases:
                req = {
                    "prompt": p,
                    "multi_modal_data": {"image": im},
                    "mm_processor_kwargs": {"trio_keep_ratio": r},
                }
                [out] = llm.generate([req], first, use_tqdm=False)
                lp = out.outputs[0].logprobs[0]
                got = torch.tensor([lp[i].logprob for i in range(len(lp))])
                rows.append(
                    dict(
                        mode=mode,
                        ratio=r,
                        prompt_tokens=len(out.prompt_token_ids),
                        question=p.split("\n")[-1][:40],
                        max_abs_diff=float((got - want[(p, r)]).abs().max()),
                        same_argmax=bool(got.argmax() == want[(p, r)].argmax()),
                    )
                )
            del llm
    columns = [
        ("mode", "mode", ""), ("ratio", "ratio", ".3f"), ("prompt_tokens", "prompt", "d"),
        ("question", "question", ""), ("max_abs_diff", "max |dlogprob|", ".2e"),
        ("same_argmax", "same argmax", ""),
    ]  # fmt: skip
    meta = dict(depth=args.depth, chunk=args.chunk, compiled=not args.eager, dtype="float32")
    print(" ".join(f"{k}={v}" for k, v in meta.items()))
    print(table(rows, columns))
    for mode in ("input", "layer"):
        worst = max(r["max_abs_diff"] for r in rows if r["mode"] == mode)
        print(f"{mode}: worst max |dlogprob| vs the in-LLM reference = {worst:.2e}")
    print(f"saved {save('layer_mode_oracle', {'meta': meta, 'rows': rows})}")


if __name__ == "__main__":
    main()
