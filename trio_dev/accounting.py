"""vLLM's own KV-cache accounting for one request, read from an in-process engine.

Used by tests and benchmarks to show that pruning shrinks what the scheduler
actually allocates (not a number we compute ourselves).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RequestKV:
    prompt_tokens: int
    kv_blocks: int
    block_size: int


def measure_prompt_kv(llm: Any, prompt: Any, request_id: str = "trio-kv-probe") -> RequestKV:
    """Prefill ``prompt`` alone and report the KV blocks the scheduler gave it.

    Needs ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (in-process engine core) and an
    otherwise idle engine. The request is aborted afterwards, freeing its blocks.
    """
    from vllm import SamplingParams

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    manager = scheduler.kv_cache_manager
    if engine.has_unfinished_requests():
        raise RuntimeError("measure_prompt_kv needs an idle engine")
    engine.add_request(
        request_id,
        prompt,
        SamplingParams(max_tokens=64, temperature=0, ignore_eos=True),
    )
    try:
        # The engine core knows the request under an internal id.
        [internal_id] = list(scheduler.requests)
        req = scheduler.requests[internal_id]
        # Chunked prefill may need several steps; stop once the prompt is in.
        while req.num_computed_tokens < req.num_prompt_tokens:
            engine.step()
        prompt_tokens = req.num_prompt_tokens
        blocks = sum(len(group) for group in manager.get_block_ids(internal_id))
    finally:
        engine.abort_request([request_id])
        while engine.has_unfinished_requests():
            engine.step()
    return RequestKV(prompt_tokens=prompt_tokens, kv_blocks=blocks, block_size=scheduler.block_size)
