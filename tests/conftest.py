"""Shared fixtures: one locally built checkpoint and one engine of each kind per session.

Engines start in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so tests can
read vLLM's own scheduler state and the model's last selection directly.
Every in-process engine fixture is session-scoped: vLLM's parallel state is
global per process, and an in-process engine that is dropped (a module-scoped
fixture at module end) tears it down for every other in-process engine.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# ``benchmarks`` is a top-level directory of the repository, not an installed
# package; tests of the quality benchmark import it from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pytest
from PIL import Image

#: Depth used by engine tests (the tiny model has 4 decoder layers).
TEST_DEPTH = 1
#: Engine settings shared by every engine the tests start.
ENGINE_KWARGS = dict(
    max_model_len=2048,
    enforce_eager=True,
    kv_cache_memory_bytes=64 << 20,
    limit_mm_per_prompt={"image": 2},
    seed=0,
    # Exact comparisons with the HF side need the checkpoint's float32 (vLLM's
    # CPU build would otherwise pick bfloat16).
    dtype="float32",
)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trio_dev.checkpoints import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny", seed=0)


def make_image(seed: int, size: tuple[int, int] = (112, 112)) -> Image.Image:
    """A deterministic RGB test image with some structure (blocks + noise)."""
    rng = np.random.RandomState(seed)
    w, h = size
    base = rng.randint(0, 255, size=(4, 4, 3)).astype(np.float32)
    img = np.kron(base, np.ones((h // 4 + 1, w // 4 + 1, 1)))[:h, :w]
    img = np.clip(img + rng.normal(0, 20, size=img.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(img)


def chat_prompt(question: str, num_images: int = 1) -> str:
    """The tiny checkpoint's vicuna-style prompt with ``num_images`` placeholders."""
    return "USER: " + "<image>\n" * num_images + question + " ASSISTANT:"


@pytest.fixture(scope="session")
def trio_llm(tiny_ckpt: Path):
    """TRIO engine: prefix caching on, chunked prefill with small chunks."""
    from vllm import LLM

    import vllm_trio

    return LLM(
        model=str(tiny_ckpt),
        enable_prefix_caching=True,
        enable_chunked_prefill=True,
        max_num_batched_tokens=96,
        **ENGINE_KWARGS,
        **vllm_trio.engine_kwargs(keep_ratio=0.25, depth=TEST_DEPTH),
    )


@pytest.fixture(scope="session")
def trio_llm_nocache(tiny_ckpt: Path):
    """TRIO engine with every cache off and no chunking: the 'alone' baseline."""
    from vllm import LLM

    import vllm_trio

    return LLM(
        model=str(tiny_ckpt),
        enable_prefix_caching=False,
        mm_processor_cache_gb=0,
        max_num_batched_tokens=2048,
        **ENGINE_KWARGS,
        **vllm_trio.engine_kwargs(keep_ratio=0.25, depth=TEST_DEPTH),
    )


@pytest.fixture(scope="session")
def stock_llm(tiny_ckpt: Path):
    """Stock vLLM LLaVA-NeXT on the same checkpoint (package installed, TRIO off)."""
    from vllm import LLM

    return LLM(model=str(tiny_ckpt), enable_prefix_caching=False, **ENGINE_KWARGS)


@pytest.fixture(scope="session")
def qwen_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trio_dev.qwen_checkpoints import build_qwen_checkpoint

    return build_qwen_checkpoint(tmp_path_factory.mktemp("qwen") / "tiny", "qwen-tiny", seed=0)


def _clear_selection_log(model) -> None:
    model.trio_selection_log.clear()


def _selection_records(model) -> list:
    return list(model.trio_selection_log)


def _batching_off(model) -> None:
    model.trio_max_batch_rows = 1  # every image alone: the single-prompt side pass


def _batching_default(model) -> None:
    del model.trio_max_batch_rows  # back to the class default


def batched_and_alone(llm, reqs: list[dict], params) -> tuple[tuple, tuple]:
    """``reqs`` submitted together, then each alone with batched side passes off.

    Together, the images of requests scheduled in the same step are encoded
    in one ``embed_multimodal`` call, hence one batched side pass; alone,
    every image runs the single-prompt side pass. Returns ``(outputs,
    selection records)`` of each way; records are keyed by ``(prompt ids,
    ordinal)``.
    """

    def run(batch: list[dict]) -> tuple[list, list]:
        # Nothing may come from a cache: every image must be encoded and scored.
        llm.reset_prefix_cache()
        llm.reset_mm_cache()
        llm.llm_engine.reset_encoder_cache()
        llm.apply_model(_clear_selection_log)
        outputs = llm.generate(batch, params, use_tqdm=False)
        [records] = llm.apply_model(_selection_records)
        return outputs, records

    together, together_log = run(reqs)
    llm.apply_model(_batching_off)
    try:
        alone, alone_log = [], []
        for req in reqs:
            out, log = run([req])
            alone += out
            alone_log += log
    finally:
        llm.apply_model(_batching_default)

    def keyed(log: list) -> dict:
        return {(tuple(r.prompt_ids), r.ordinal): r for r in log}

    return (together, keyed(together_log)), (alone, keyed(alone_log))


def assert_batched_equals_alone(
    llm, reqs: list[dict], params, images: int, batch_size: int
) -> None:
    """:func:`batched_and_alone`, then: ``images`` images scored, together in
    batches of ``batch_size`` and alone one by one, with the same kept indices,
    prompt ids and generated tokens."""
    (together, batch_log), (alone, alone_log) = batched_and_alone(llm, reqs, params)
    assert batch_log.keys() == alone_log.keys() and len(batch_log) == images
    assert {r.batch_size for r in batch_log.values()} == {batch_size}
    assert {r.batch_size for r in alone_log.values()} == {1}
    for key, rec in batch_log.items():
        assert rec.keep == alone_log[key].keep, key
    for got, want in zip(together, alone, strict=True):
        assert got.prompt_token_ids == want.prompt_token_ids
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
