"""vllm-trio: TRIO visual-token pruning for LLaVA-NeXT served by vLLM.

Layout: ``core/`` the algorithm (pure PyTorch, no vLLM import); ``binding/``
the vLLM model, processor and side pass; ``requests/`` what clients and
operators may send (CLI group, ``vllm_xargs.keep_ratio``, media 400s);
``patches/`` every change made to vLLM's own objects; ``plugin`` the entry
point; ``config`` the server-wide settings and the families served;
``versions`` the vLLM versions supported. Test and benchmark tooling lives in
the repository's ``trio_dev/``, not in the package.
"""

from __future__ import annotations

from typing import Any

from .config import DEFAULT_DEPTH, DEFAULT_KEEP_RATIO, DEFAULT_MODE, TrioConfig


def engine_kwargs(
    keep_ratio: float = DEFAULT_KEEP_RATIO,
    depth: int = DEFAULT_DEPTH,
    mode: str = DEFAULT_MODE,
    **hf_overrides: Any,
) -> dict[str, Any]:
    """Keyword arguments that switch TRIO on for ``vllm.LLM(...)`` (offline).

    ``LLM(model, **vllm_trio.engine_kwargs(keep_ratio=0.25))`` is the offline
    equivalent of ``vllm serve model --plugin trio --trio-keep-ratio 0.25``;
    per prompt, pass ``mm_processor_kwargs={"trio_keep_ratio": r}``. ``mode``
    is ``--trio-mode`` (``"input"`` or ``"layer"``).
    """
    trio = TrioConfig(keep_ratio=keep_ratio, depth=depth, mode=mode)
    return {"hf_overrides": trio.hf_overrides(hf_overrides or None)}


__all__ = ["TrioConfig", "engine_kwargs"]
