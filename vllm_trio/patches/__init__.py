"""The patch inventory: every change vllm-trio makes to vLLM's own objects.

vLLM has no public hook for (a) adding a ``--plugin`` switch to ``vllm
serve`` or (b) letting a validated ``vllm_xargs`` field choose the multimodal
processing of a request; vLLM 0.32/0.33 also (c) hang on SIGTERM with streams
in flight. Each module here holds one :class:`Patch`: its target, why it
exists, and when it can go. Every wrapper is inert unless the served model is
TRIO's (``--plugin trio``): stock serving with the package installed behaves
exactly as stock vLLM.

On a vLLM version outside the supported range (``vllm_trio.versions``) only
the command-line patch is installed, so that ``--plugin trio`` fails with the
reason; nothing else of vLLM is touched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger("vllm_trio")


@dataclass(frozen=True)
class Patch:
    """One wrapper around a vLLM object, installed when ``module`` is imported."""

    name: str
    #: The vLLM module holding every target; importing it installs the patch.
    module: str
    #: Dotted paths of the vLLM attributes replaced.
    targets: tuple[str, ...]
    why: str
    remove_when: str
    install: Callable[[], None]


_applied: set[str] = set()
_scheduled: set[str] = set()


def inventory() -> tuple[Patch, ...]:
    from . import (
        async_llm_shutdown,
        engine_args,
        metrics_registry,
        mm_pruning_runners,
        online_renderer,
        serving_entry_points,
    )

    return (
        engine_args.PATCH,
        online_renderer.PATCH,
        *serving_entry_points.PATCHES,
        async_llm_shutdown.PATCH,
        metrics_registry.PATCH,
        *mm_pruning_runners.PATCHES,
    )


def apply() -> None:
    """Schedule every patch for when its module is imported (idempotent).

    Nothing is imported here: a process that never imports, say, the OpenAI
    serving layer (an engine worker) never pays for it or for its patch.
    """
    from ..versions import installed_vllm, unsupported_reason
    from ._on_import import when_imported

    reason = unsupported_reason()
    for patch in inventory():
        if patch.name in _scheduled or (reason is not None and patch.name != "engine_args"):
            continue
        _scheduled.add(patch.name)
        when_imported(patch.module, lambda _module, patch=patch: _install(patch))
    if reason is not None and "unsupported-logged" not in _scheduled:
        _scheduled.add("unsupported-logged")
        logger.error("%s", reason)
    else:
        logger.debug(
            "vllm-trio: %d patches scheduled on vLLM %s", len(_scheduled), installed_vllm()
        )


def _install(patch: Patch) -> None:
    patch.install()
    _applied.add(patch.name)
    logger.debug("vllm-trio: patched %s (%s)", ", ".join(patch.targets), patch.why)


def is_trio_model(model_config: object) -> bool:
    """Whether a vLLM ``ModelConfig`` serves a TRIO architecture."""
    from ..config import TRIO_ARCHS

    hf_config = getattr(model_config, "hf_config", None)
    return any(a in TRIO_ARCHS for a in (getattr(hf_config, "architectures", None) or []))
