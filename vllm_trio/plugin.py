"""The ``vllm.general_plugins`` entry point (loaded in every vLLM process).

Registration is lazy and side-effect free for stock serving: the TRIO
architecture is only *available*; a model uses it only when ``--plugin trio``
(or :func:`vllm_trio.engine_kwargs` offline) selects it through
``hf_overrides``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm.model_executor.models.config import VerifyAndUpdateConfig

from .config import TRIO_ARCH, check_pipeline_parallel

if TYPE_CHECKING:
    from vllm.config import VllmConfig


class TrioEngineConfigCheck(VerifyAndUpdateConfig):
    """vLLM's per-architecture config hook, run where the engine config is built.

    That is the process that calls ``vllm serve`` or ``LLM(...)``, before any
    engine or worker process exists, so an unsupported layout fails there
    with TRIO's message instead of inside every worker.
    """

    @staticmethod
    def verify_and_update_config(vllm_config: VllmConfig) -> None:
        check_pipeline_parallel(vllm_config.parallel_config.pipeline_parallel_size)


def register() -> None:
    """Register the TRIO model class, its config check and the serving hooks (idempotent)."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from . import patching

    if TRIO_ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(
            TRIO_ARCH, "vllm_trio.binding.model:TrioLlavaNextForConditionalGeneration"
        )
    MODELS_CONFIG_MAP.setdefault(TRIO_ARCH, TrioEngineConfigCheck)
    patching.apply()
