"""Shared pieces of the speed/memory benchmarks: images, requests, engines, output."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image, ImageDraw

from trio_dev.local_server import image_chat_messages

RESULTS = Path(__file__).parent / "results"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
RATIOS = (1.0, 0.333, 0.222, 0.111)
QUESTION = "What colour is the circle?"
#: (width, height) of test images; on the bench model these give anyres grids
#: 1x2, 2x1 and 2x2 tiles (2,928 visual tokens at 672x672).
IMAGE_SIZES = ((336, 672), (672, 336), (672, 672))


def scene(width: int, height: int) -> Image.Image:
    """A red circle, a blue square and a word: small objects on a plain background."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.ellipse([width // 8, height // 3, width // 3, 2 * height // 3], fill="red")
    d.rectangle([5 * width // 8, height // 3, 7 * width // 8, 2 * height // 3], fill="blue")
    d.text((width // 2, height // 8), "TRIO 42", fill="black")
    return img


#: One-image prompt of each family's chat format (``preset`` names starting
#: with ``qwen`` are Qwen2.5-VL checkpoints, ``trio_dev.qwen_checkpoints``).
PROMPTS = {
    "llava": f"USER: <image>\n{QUESTION} ASSISTANT:",
    "qwen": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    f"<|vision_start|><|image_pad|><|vision_end|>{QUESTION}<|im_end|>\n"
    "<|im_start|>assistant\n",
}


def family(preset: str) -> str:
    return "qwen" if preset.startswith("qwen") else "llava"


def offline_request(image: Image.Image, ratio: float | None, fam: str = "llava") -> dict[str, Any]:
    """An ``LLM.generate`` prompt with one image and an optional per-prompt ratio."""
    req: dict[str, Any] = {"prompt": PROMPTS[fam], "multi_modal_data": {"image": image}}
    if ratio is not None:
        req["mm_processor_kwargs"] = {"trio_keep_ratio": ratio}
    return req


def chat_messages(image: Image.Image) -> list[dict[str, Any]]:
    """OpenAI chat messages: the image as a base64 data URL, then ``QUESTION``."""
    return image_chat_messages(QUESTION, [image])


def bench_checkpoint(preset: str = "bench") -> Path:
    if family(preset) == "qwen":
        from trio_dev.qwen_checkpoints import build_qwen_checkpoint

        return build_qwen_checkpoint(ARTIFACTS / f"ckpt-{preset}", preset)
    from trio_dev.checkpoints import build_checkpoint

    return build_checkpoint(ARTIFACTS / f"ckpt-{preset}", preset=preset)


def offline_engines(
    ckpt: Path, depth: int, block_size: int = 32, modes: tuple[str, ...] = ("input",), **extra: Any
):
    """Stock and one TRIO in-process engine per ``--trio-mode`` (``{mode: engine}``),
    with identical settings, caches off."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    import vllm_trio

    common = dict(
        model=str(ckpt),
        max_model_len=4096,
        enforce_eager=True,
        kv_cache_memory_bytes=1 << 30,
        enable_prefix_caching=False,
        mm_processor_cache_gb=0,
        block_size=block_size,
        max_num_batched_tokens=4096,
        seed=0,
        **extra,
    )
    stock = LLM(**common)
    trios = {
        mode: LLM(**common, **vllm_trio.engine_kwargs(keep_ratio=1.0, depth=depth, mode=mode))
        for mode in modes
    }
    return stock, trios


def paired_median_times(
    runs: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds of each run, the runs interleaved so that drift
    in the machine's load (it is shared) hits them alike.

    CPU time is this process's (``time.process_time``): with in-process engines
    it is the engine's own work, which other jobs on a shared machine inflate far
    less than they inflate wall time.
    """
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {
        name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t))
        for name, t in times.items()
    }


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def save(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table: ``columns`` are (key, header, format spec)."""
    head = "  ".join(f"{h:>{max(len(h), 8)}}" for _, h, _ in columns)
    lines = [head]
    for row in rows:
        cells = []
        for key, h, spec in columns:
            value = row.get(key)
            text = "-" if value is None else format(value, spec)
            cells.append(f"{text:>{max(len(h), 8)}}")
        lines.append("  ".join(cells))
    return "\n".join(lines)
