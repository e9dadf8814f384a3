"""The ``vllm.general_plugins`` entry point, loaded in every vLLM process.

Free for stock serving: :func:`register` imports no vLLM model code (each
TRIO architecture is registered as a lazy ``"module:Class"`` string that
vLLM imports only when a model is served with it), installs wrappers that are
inert unless the served model is TRIO's, and on an unsupported vLLM version
logs one error and leaves vLLM untouched except for ``--plugin trio``, which
then fails with the reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm.model_executor.models.config import VerifyAndUpdateConfig

from .config import FAMILIES
from .layout import check_layout

if TYPE_CHECKING:
    from vllm.config import VllmConfig


class TrioEngineConfigCheck(VerifyAndUpdateConfig):
    """vLLM's per-architecture config hook, run where the engine config is built."""

    @staticmethod
    def verify_and_update_config(vllm_config: VllmConfig) -> None:
        check_layout(vllm_config)


def register() -> None:
    """Register the TRIO architectures, their config check and the patches (idempotent)."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from . import patches
    from .log import log_through_vllm

    log_through_vllm()
    supported = ModelRegistry.get_supported_archs()
    for family in FAMILIES.values():
        if family.trio_arch not in supported:
            ModelRegistry.register_model(family.trio_arch, family.model_class)
        MODELS_CONFIG_MAP.setdefault(family.trio_arch, TrioEngineConfigCheck)
    patches.apply()
