"""Every change vllm-trio makes to vLLM's own objects, in one place.

vLLM 0.32 has no public hook for (a) adding a ``--plugin`` switch to
``vllm serve`` or (b) letting a validated ``vllm_xargs`` field choose the
multimodal processing of a request (the processor runs before sampling params
exist, and per-request ``mm_processor_kwargs`` need
``--trust-request-mm-kwargs``). These wrappers are small, logged,
version-checked, idempotent, and inert unless the served model is TRIO's.
"""

from __future__ import annotations

import argparse
import functools
import logging
from collections.abc import Callable
from typing import Any

from .config import DEFAULT_DEPTH, DEFAULT_KEEP_RATIO, TRIO_ARCH, TrioConfig
from .core.budget import validate_keep_ratio
from .processor import KEEP_RATIO_KWARG

logger = logging.getLogger("vllm_trio")

SUPPORTED_VLLM = ("0.32.0",)
#: The per-request field on the OpenAI API: ``extra_body={"vllm_xargs": {"keep_ratio": r}}``.
XARGS_KEEP_RATIO = "keep_ratio"
PLUGIN_NAME = "trio"

_applied = False


def apply() -> None:
    """Install the wrappers once per process."""
    global _applied
    if _applied:
        return
    import vllm

    base_version = vllm.__version__.split("+")[0]
    if base_version not in SUPPORTED_VLLM:
        raise RuntimeError(
            f"vllm-trio supports vLLM {', '.join(SUPPORTED_VLLM)}; found {vllm.__version__}"
        )
    _patch_engine_args()
    _patch_online_renderer()
    _applied = True
    logger.debug("vllm-trio patches applied to vLLM %s", vllm.__version__)


# --- (a) `vllm serve ... --plugin trio` --------------------------------------


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """The ``vllm-trio`` argument group (shown in ``vllm serve --help``)."""
    group = parser.add_argument_group(
        "vllm-trio", "TRIO visual-token pruning for LLaVA-NeXT (package vllm-trio)."
    )
    group.add_argument(
        "--plugin",
        action="append",
        choices=[PLUGIN_NAME],
        default=None,
        help="Switch on an installed vLLM plugin. `--plugin trio` serves LLaVA-NeXT with "
        "TRIO pruning: each image keeps a fraction of its visual tokens, chosen per "
        'request with extra_body={"vllm_xargs": {"keep_ratio": r}}.',
    )
    group.add_argument(
        "--trio-keep-ratio",
        type=float,
        default=None,
        help=f"Default fraction of visual tokens kept per image, in (0, 1] "
        f"(default {DEFAULT_KEEP_RATIO}). 1 serves exactly as stock vLLM.",
    )
    group.add_argument(
        "--trio-depth",
        type=int,
        default=None,
        help=f"Decoder layer L whose input is scored by TRIO's side pass (default "
        f"{DEFAULT_DEPTH}); the side pass costs about (L + 0.5)/num_layers of a prefill.",
    )


def trio_config_from_args(args: argparse.Namespace) -> TrioConfig | None:
    """The TRIO settings selected on the command line, or None without ``--plugin trio``."""
    enabled = PLUGIN_NAME in (getattr(args, "plugin", None) or [])
    ratio = getattr(args, "trio_keep_ratio", None)
    depth = getattr(args, "trio_depth", None)
    if not enabled:
        if ratio is not None or depth is not None:
            raise ValueError("--trio-keep-ratio/--trio-depth need --plugin trio")
        return None
    return TrioConfig(
        keep_ratio=DEFAULT_KEEP_RATIO if ratio is None else ratio,
        depth=DEFAULT_DEPTH if depth is None else depth,
    )


def merge_hf_overrides(existing: Any, trio: TrioConfig) -> Any:
    """``existing`` hf_overrides (dict, callable or None) plus TRIO's."""
    extra = trio.hf_overrides()
    if existing is None:
        return extra
    if isinstance(existing, dict):
        return {**existing, **extra}
    if callable(existing):

        def combined(config: Any) -> Any:
            config = existing(config)
            for key, value in extra.items():
                setattr(config, key, value)
            return config

        return combined
    raise TypeError(f"unsupported hf_overrides type {type(existing).__name__}")


def _patch_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original_add: Callable[..., Any] = EngineArgs.add_cli_args
    original_from: Callable[..., Any] = EngineArgs.from_cli_args.__func__  # type: ignore[attr-defined]

    @functools.wraps(original_add)
    def add_cli_args_with_trio(parser, *args, **kwargs):
        parser = original_add(parser, *args, **kwargs)
        if not any(a.dest == "plugin" for a in parser._actions):
            add_cli_args(parser)
        return parser

    @functools.wraps(original_from)
    def from_cli_args_with_trio(cls, args: argparse.Namespace):
        engine_args = original_from(cls, args)
        trio = trio_config_from_args(args)
        if trio is not None:
            engine_args.hf_overrides = merge_hf_overrides(engine_args.hf_overrides, trio)
            logger.info(
                "vllm-trio: TRIO pruning on (default keep_ratio=%s, depth=%s)",
                trio.keep_ratio,
                trio.depth,
            )
        return engine_args

    EngineArgs.add_cli_args = staticmethod(add_cli_args_with_trio)  # type: ignore[method-assign]
    EngineArgs.from_cli_args = classmethod(from_cli_args_with_trio)  # type: ignore[method-assign]


# --- (b) per-request keep ratio through `vllm_xargs` -------------------------


def keep_ratio_from_request(request: Any) -> float | None:
    """Validated ``vllm_xargs.keep_ratio`` of an OpenAI request, if present."""
    from vllm.exceptions import VLLMValidationError

    xargs = getattr(request, "vllm_xargs", None) or {}
    if XARGS_KEEP_RATIO not in xargs:
        return None
    field = f"vllm_xargs.{XARGS_KEEP_RATIO}"
    try:
        return validate_keep_ratio(xargs[XARGS_KEEP_RATIO], field)
    except ValueError as exc:
        raise VLLMValidationError(str(exc), parameter=field, value=xargs[XARGS_KEEP_RATIO]) from exc


def _is_trio_model(model_config: Any) -> bool:
    return TRIO_ARCH in (getattr(model_config.hf_config, "architectures", None) or [])


def _patch_online_renderer() -> None:
    from vllm.renderers import online_renderer
    from vllm.renderers.online_renderer import OnlineRenderer

    original_validate = online_renderer.validate_request_mm_kwargs

    @functools.wraps(original_validate)
    def validate_without_trio(*, mm_processor_kwargs, **kwargs):
        # TRIO's key was validated by `_bridge`; only the rest needs trust.
        rest = {k: v for k, v in (mm_processor_kwargs or {}).items() if k != KEEP_RATIO_KWARG}
        return original_validate(mm_processor_kwargs=rest or None, **kwargs)

    def bridge(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        async def wrapper(self, request, *args, **kwargs):
            if _is_trio_model(self.model_config):
                ratio = keep_ratio_from_request(request)
                mm_kwargs = dict(getattr(request, "mm_processor_kwargs", None) or {})
                if KEEP_RATIO_KWARG in mm_kwargs:
                    from vllm.exceptions import VLLMValidationError

                    try:
                        validate_keep_ratio(
                            mm_kwargs[KEEP_RATIO_KWARG],
                            f"mm_processor_kwargs.{KEEP_RATIO_KWARG}",
                        )
                    except ValueError as exc:
                        raise VLLMValidationError(
                            str(exc),
                            parameter=f"mm_processor_kwargs.{KEEP_RATIO_KWARG}",
                        ) from exc
                if ratio is not None:
                    mm_kwargs[KEEP_RATIO_KWARG] = ratio
                    request.mm_processor_kwargs = mm_kwargs
            return await method(self, request, *args, **kwargs)

        return wrapper

    online_renderer.validate_request_mm_kwargs = validate_without_trio
    OnlineRenderer.preprocess_chat = bridge(OnlineRenderer.preprocess_chat)  # type: ignore[method-assign]
    OnlineRenderer.preprocess_cmpl = bridge(OnlineRenderer.preprocess_cmpl)  # type: ignore[method-assign]
