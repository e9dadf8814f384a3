"""The main job on the embedded default: serve a LLaVA-NeXT with
``vllm serve ... --plugin trio`` and answer image chat requests at several
keep ratios, printing the (pruned) prompt tokens vLLM reports and the answers.

    python scripts/demo.py [--preset scenes|tiny|bench] [--out artifacts]

Nothing is downloaded. The default ``scenes`` preset serves the small
LLaVA-NeXT trained on generated scenes that ships in
``benchmarks/quality/model`` and asks it three eval-split questions, so the
answers mean something (expected answers are printed next to them; the model
scores 83.5% unpruned on 600 eval questions), scoring at the layer where that
model reads the image (``shipped.reading_layer``: 3). ``tiny`` and ``bench`` build a
random-weight checkpoint on the spot: there the answers are noise and the
point is the plumbing and the token counts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import requests
from openai import OpenAI
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
# ``trio_dev`` (dev tooling) and ``benchmarks`` are directories of the checkout,
# not part of the installed package.
sys.path.insert(0, str(ROOT))

from trio_dev.checkpoints import build_checkpoint  # noqa: E402
from trio_dev.local_server import TEST_SERVER_ARGS, image_chat_messages, vllm_server  # noqa: E402


def scene(size: int) -> Image.Image:
    """A red circle left of a blue square on white: the kind of question TRIO targets."""
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    s = size // 8
    d.ellipse([s, 3 * s, 3 * s, 5 * s], fill="red")
    d.rectangle([5 * s, 3 * s, 7 * s, 5 * s], fill="blue")
    return img


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", default="scenes", choices=["scenes", "tiny", "bench"])
    ap.add_argument("--out", type=Path, default=Path("artifacts"))
    ap.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.25, 0.111])
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    cmd = ["--plugin", "trio", "--trio-keep-ratio", "0.25"]
    if args.preset == "scenes":
        from benchmarks.quality.shipped import MODEL_DIR, demo_samples, reading_layer

        ckpt = MODEL_DIR
        samples = demo_samples(ckpt)
        questions = [(s.image, s.question, s.answer) for s in samples]
        depth = reading_layer(ckpt)
        if depth is not None:
            cmd += ["--trio-depth", str(depth)]
    else:
        ckpt = build_checkpoint(args.out / f"ckpt-{args.preset}", preset=args.preset)
        image = scene(112 if args.preset == "tiny" else 672)
        questions = [(image, "What colour is the circle?", None)]
    server_args = list(TEST_SERVER_ARGS)
    if args.preset == "bench":
        server_args[server_args.index("--max-model-len") + 1] = "4096"
    print(f"$ vllm serve {ckpt} {' '.join(cmd)}", flush=True)
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    with vllm_server(ckpt, cmd, args.out / "demo_server.log", base_args=tuple(server_args)) as base:
        client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)
        model = client.models.list().data[0].id
        for image, question, expected in questions:
            print(f"Q: {question}" + (f"  (expected: {expected})" if expected else ""), flush=True)
            for r in args.ratios:
                out = client.chat.completions.create(
                    model=model,
                    messages=image_chat_messages(question, [image]),
                    max_tokens=8,
                    temperature=0,
                    extra_body={"vllm_xargs": {"keep_ratio": r}},
                )
                answer = out.choices[0].message.content
                tokens = out.usage.prompt_tokens
                rows.append(
                    {"question": question, "expected": expected, "keep_ratio": r,
                     "prompt_tokens": tokens, "answer": answer}
                )  # fmt: skip
                print(f"  keep_ratio={r:<6} prompt_tokens={tokens:<5} answer={answer!r}")
        print("$ curl /metrics | grep -E 'vllm:trio_.*_(sum|count)'")
        for line in requests.get(f"{base}/metrics", timeout=30).text.splitlines():
            if line.startswith("vllm:trio_") and re.match(r"\S+_(sum|count)\{", line):
                print(" ", line)
    (args.out / "demo.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
