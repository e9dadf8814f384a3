"""Send one real request to a running server the way lmms-eval's OpenAI backend does.

    vllm serve MODEL --plugin trio --trio-keep-ratio 0.111 &
    .venv/bin/python -m benchmarks.quality.lmms_eval_smoke \
        --base-url http://127.0.0.1:8000/v1 [--image scene.png] [--keep-ratio 0.25]

Before spending hours on POPE or MME, check that the path lmms-eval will use
works end to end and that pruning is on: this prints the answer and
``usage.prompt_tokens``, which shrinks with the keep ratio when the server
runs ``--plugin trio`` (compare ``--keep-ratio 1``).

Client settings copied from lmms-eval's ``openai`` model (chat backend,
``lmms_eval/models/chat/openai.py`` and ``protocol.ChatMessages``): the
``openai`` client's ``chat.completions.create`` with ``model``,
``messages``, ``max_tokens`` and ``temperature`` (0, greedy); base URL and
key from ``base_url=``/``api_key=`` or ``OPENAI_API_BASE``/``OPENAI_API_KEY``;
one user turn with the image parts first, then the text; every image as a
base64 PNG ``data:image/png;base64,...`` URL. lmms-eval sends no
``vllm_xargs``, so there the server's ``--trio-keep-ratio`` decides;
``--keep-ratio`` here adds ``extra_body={"vllm_xargs": {"keep_ratio": r}}``
to try per-request ratios.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from openai import OpenAI
from openai.types.chat import ChatCompletion
from PIL import Image

from trio_dev.local_server import image_chat_messages


def default_sample() -> tuple[Image.Image, str, str]:
    """A generated scene with its question and answer (no files needed)."""
    from .grid_scenes import make_split

    sample = make_split("eval", 1)[0]
    return sample.image, sample.question, sample.answer


def lmms_style_chat(
    client: OpenAI,
    model: str,
    image: Image.Image,
    question: str,
    max_tokens: int = 16,
    keep_ratio: float | None = None,
) -> ChatCompletion:
    """One chat request shaped as lmms-eval's ``openai`` chat backend sends it:
    one user turn, the image as an RGB PNG data URL first, then the text."""
    messages = image_chat_messages(question, [image])
    extra = None if keep_ratio is None else {"vllm_xargs": {"keep_ratio": keep_ratio}}
    return client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        extra_body=extra,
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--base-url",
        default=os.getenv("OPENAI_API_BASE", "http://127.0.0.1:8000/v1"),
        help="server's OpenAI base URL (lmms-eval: base_url= or OPENAI_API_BASE)",
    )
    ap.add_argument(
        "--api-key",
        default=os.getenv("OPENAI_API_KEY", "EMPTY"),
        help="vllm serve without --api-key accepts any key",
    )
    ap.add_argument("--model", help="served model name (default: the server's first model)")
    ap.add_argument("--image", help="image file (default: a generated scene)")
    ap.add_argument("--question", help="question text (default: the scene's question)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--keep-ratio", type=float, help="per-request ratio via vllm_xargs")
    args = ap.parse_args(argv)

    if args.image:
        image, question, expected = Image.open(args.image), args.question or "Describe.", None
    else:
        image, question, expected = default_sample()
        question = args.question or question
    client = OpenAI(base_url=args.base_url.rstrip("/"), api_key=args.api_key, max_retries=0)
    model = args.model or client.models.list().data[0].id
    response = lmms_style_chat(client, model, image, question, args.max_tokens, args.keep_ratio)
    print(f"model: {model}")
    print(f"question: {question}")
    print(f"answer: {response.choices[0].message.content!r}")
    if expected is not None:
        print(f"expected: {expected!r}")
    usage = response.usage
    print(f"prompt_tokens: {usage.prompt_tokens if usage else 'n/a'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
