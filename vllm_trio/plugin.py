"""The ``vllm.general_plugins`` entry point (loaded in every vLLM process).

Registration is lazy and side-effect free for stock serving: the TRIO
architecture is only *available*; a model uses it only when ``--plugin trio``
(or :func:`vllm_trio.engine_kwargs` offline) selects it through
``hf_overrides``.
"""

from __future__ import annotations

from .config import TRIO_ARCH


def register() -> None:
    """Register the TRIO model class and the serving hooks (idempotent)."""
    from vllm import ModelRegistry

    from . import patching

    if TRIO_ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(
            TRIO_ARCH, "vllm_trio.model:TrioLlavaNextForConditionalGeneration"
        )
    patching.apply()
