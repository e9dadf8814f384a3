"""The main job on the embedded default: serve a locally built LLaVA-NeXT with
``vllm serve ... --plugin trio`` and answer one image chat request at several
keep ratios, printing the (pruned) prompt tokens vLLM reports.

    python scripts/demo.py [--preset tiny|bench] [--out artifacts]

Nothing is downloaded: the checkpoint (config, seeded random weights, tokenizer,
processor) is built on the spot. Random weights mean the answers are noise; the
point is the plumbing and the token counts.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
from pathlib import Path

from openai import OpenAI
from PIL import Image, ImageDraw

from vllm_trio.checkpoints import build_checkpoint
from vllm_trio.local_server import TEST_SERVER_ARGS, vllm_server


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
    ap.add_argument("--preset", default="tiny", choices=["tiny", "bench"])
    ap.add_argument("--out", type=Path, default=Path("artifacts"))
    ap.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.25, 0.111])
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    ckpt = build_checkpoint(args.out / f"ckpt-{args.preset}", preset=args.preset)
    image = scene(112 if args.preset == "tiny" else 672)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "What colour is the circle?"},
            ],
        }
    ]
    server_args = list(TEST_SERVER_ARGS)
    if args.preset == "bench":
        server_args[server_args.index("--max-model-len") + 1] = "4096"
    cmd = ["--plugin", "trio", "--trio-keep-ratio", "0.25"]
    print(f"$ vllm serve {ckpt} {' '.join(cmd)}", flush=True)
    rows = []
    with vllm_server(ckpt, cmd, args.out / "demo_server.log", base_args=tuple(server_args)) as base:
        client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)
        model = client.models.list().data[0].id
        for r in args.ratios:
            out = client.chat.completions.create(
                model=model,
                messages=messages,
                max_tokens=8,
                temperature=0,
                extra_body={"vllm_xargs": {"keep_ratio": r}},
            )
            rows.append({"keep_ratio": r, "prompt_tokens": out.usage.prompt_tokens,
                         "answer": out.choices[0].message.content})  # fmt: skip
            print(f"keep_ratio={r:<6} prompt_tokens={out.usage.prompt_tokens:<5} "
                  f"answer={out.choices[0].message.content!r}", flush=True)  # fmt: skip
    (args.out / "demo.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
