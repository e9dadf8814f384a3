"""Every change vllm-trio makes to vLLM's own objects, in one place.

vLLM 0.32 has no public hook for (a) adding a ``--plugin`` switch to
``vllm serve`` or (b) letting a validated ``vllm_xargs`` field choose the
multimodal processing of a request (the processor runs before sampling params
exist, and per-request ``mm_processor_kwargs`` need
``--trust-request-mm-kwargs``). It also (c) fixes a shutdown hang of vLLM 0.32
that a TRIO server must not have (see :func:`_patch_async_llm_shutdown`).
These wrappers are small, logged, version-checked, idempotent, and inert
unless the served model is TRIO's.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import logging
import re
from collections.abc import Callable
from typing import Any

from .binding.processor import KEEP_RATIO_KWARG
from .config import DEFAULT_DEPTH, DEFAULT_KEEP_RATIO, TRIO_ARCH, TrioConfig
from .core.budget import validate_keep_ratio

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
    _log_through_vllm()
    _patch_engine_args()
    _patch_online_renderer()
    _patch_async_llm_shutdown()
    _applied = True
    logger.debug("vllm-trio patches applied to vLLM %s", vllm.__version__)


class _VllmLogHandler(logging.Handler):
    """Hands each record to vLLM's ``vllm`` logger, as configured at that moment."""

    def emit(self, record: logging.LogRecord) -> None:
        vllm_logger = logging.getLogger("vllm")
        (vllm_logger if vllm_logger.handlers else logging.getLogger()).handle(record)


def _log_through_vllm() -> None:
    """Send this package's log records to vLLM's handler (its format and level).

    Why: vLLM configures only its own ``vllm`` logger (and reconfigures it once
    the server's arguments are parsed); without this, the ``vllm_trio``
    logger's records (e.g. "TRIO pruning on", the shutdown warning below)
    never reach a ``vllm serve`` log.
    """
    if any(isinstance(h, _VllmLogHandler) for h in logger.handlers):
        return
    logger.addHandler(_VllmLogHandler())
    logger.setLevel(logging.DEBUG)  # vLLM's handler applies VLLM_LOGGING_LEVEL
    logger.propagate = False


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
            # Written back too: with several API server processes (vLLM's
            # `--api-server-count`, implied by `--data-parallel-size`) each
            # child rebuilds its engine args from these `args` before it has
            # loaded plugins, i.e. through the unwrapped `from_cli_args`.
            args.hf_overrides = engine_args.hf_overrides
            logger.info(
                "vllm-trio: TRIO pruning on (default keep_ratio=%s, depth=%s)",
                trio.keep_ratio,
                trio.depth,
            )
        return engine_args

    EngineArgs.add_cli_args = staticmethod(add_cli_args_with_trio)  # type: ignore[method-assign]
    EngineArgs.from_cli_args = classmethod(from_cli_args_with_trio)  # type: ignore[method-assign]


# --- (b) per-request keep ratio through `vllm_xargs` -------------------------


def misspelled_xargs_key(xargs: dict[str, Any]) -> str | None:
    """A ``vllm_xargs`` key that looks like a misspelt ``keep_ratio``, if any.

    Why only near misses: ``vllm_xargs`` is vLLM's open extension dict (vLLM
    reads ``session_id`` from it, custom logits processors read their own
    keys), so unknown keys must pass through untouched. But a client that
    writes ``keepRatio``, ``trio_keep_ratio`` or ``keep_ratoi`` believes it
    chose a ratio; silently serving the default would hide that bug.
    """
    if XARGS_KEEP_RATIO in xargs:
        return None
    target = XARGS_KEEP_RATIO.replace("_", "")
    for key in xargs:
        norm = re.sub(r"[^a-z]", "", str(key).lower())
        norm = norm.removeprefix("trio")
        if norm == target or difflib.SequenceMatcher(None, norm, target).ratio() >= 0.85:
            return str(key)
    return None


def keep_ratio_from_request(request: Any) -> float | None:
    """Validated ``vllm_xargs.keep_ratio`` of an OpenAI request, if present."""
    from vllm.exceptions import VLLMValidationError

    xargs = getattr(request, "vllm_xargs", None) or {}
    typo = misspelled_xargs_key(xargs)
    if typo is not None:
        raise VLLMValidationError(
            f"unknown field vllm_xargs.{typo}: did you mean vllm_xargs.{XARGS_KEEP_RATIO}?",
            parameter=f"vllm_xargs.{typo}",
            value=xargs[typo],
        )
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
                try:
                    return await method(self, request, *args, **kwargs)
                except Exception as exc:
                    client_error = media_client_error(exc)
                    if client_error is None:
                        raise
                    raise client_error from exc
            return await method(self, request, *args, **kwargs)

        return wrapper

    online_renderer.validate_request_mm_kwargs = validate_without_trio
    OnlineRenderer.preprocess_chat = bridge(OnlineRenderer.preprocess_chat)  # type: ignore[method-assign]
    OnlineRenderer.preprocess_cmpl = bridge(OnlineRenderer.preprocess_cmpl)  # type: ignore[method-assign]
    _patch_serving_entry_points()


def media_client_error(exc: BaseException) -> Exception | None:
    """A 400 for deterministic media-loading failures that vLLM 0.32 reports as 500.

    Why: a decompression bomb and a ``file://`` URL on a server without
    ``--allowed-local-media-path`` are the client's doing and fail the same way
    on every retry, yet vLLM's media connector raises exceptions its API server
    maps to 500 ("Internal server error"), which clients and load balancers
    read as a sick server (retries, ejection). Transient fetch failures
    (connection refused, timeouts, upstream 5xx) stay 5xx on purpose, as vLLM
    intends, so that clients retry them; upstream 4xx are already vLLM's 422.
    Returns None for anything else, which then propagates unchanged.
    """
    from PIL import Image
    from vllm.exceptions import VLLMValidationError

    if isinstance(exc, Image.DecompressionBombError):
        message = f"image_url: image too large: {exc}"
    elif isinstance(exc, RuntimeError) and "--allowed-local-media-path" in str(exc):
        message = f"image_url: {exc}"
    else:
        return None
    return VLLMValidationError(message, parameter="image_url")


async def raw_keep_ratio_is_bool(raw_request: Any) -> bool:
    """Whether the JSON body sent ``vllm_xargs.keep_ratio`` as ``true``/``false``.

    vLLM types ``vllm_xargs`` values as ``str | int | float``, so pydantic turns
    JSON ``true`` into the integer 1 before any of our code runs; only the raw
    body (already read and cached by FastAPI) still shows what the client sent.
    """
    try:
        body = json.loads(await raw_request.body())
    except (ValueError, TypeError, AttributeError):
        return False
    xargs = body.get("vllm_xargs") if isinstance(body, dict) else None
    return isinstance(xargs, dict) and isinstance(xargs.get(XARGS_KEEP_RATIO), bool)


def _patch_serving_entry_points() -> None:
    """Refuse ``vllm_xargs.keep_ratio: true`` (it would otherwise mean ratio 1)."""
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion

    def refuse_bool_ratio(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        async def wrapper(self, request, raw_request=None, *args, **kwargs):
            xargs = getattr(request, "vllm_xargs", None) or {}
            value = xargs.get(XARGS_KEEP_RATIO)
            # Only an integer 0 or 1 can be a coerced bool: the body is re-read
            # for those alone, so ordinary requests pay nothing.
            if (
                type(value) is int
                and value in (0, 1)
                and raw_request is not None
                and _is_trio_model(self.model_config)
                and await raw_keep_ratio_is_bool(raw_request)
            ):
                from vllm.exceptions import VLLMValidationError

                field = f"vllm_xargs.{XARGS_KEEP_RATIO}"
                raise VLLMValidationError(
                    f"{field} must be a number in (0, 1], got bool {bool(value)!r}",
                    parameter=field,
                    value=bool(value),
                )
            return await method(self, request, raw_request, *args, **kwargs)

        return wrapper

    OpenAIServingChat.create_chat_completion = refuse_bool_ratio(  # type: ignore[method-assign]
        OpenAIServingChat.create_chat_completion
    )
    OpenAIServingCompletion.create_completion = refuse_bool_ratio(  # type: ignore[method-assign]
        OpenAIServingCompletion.create_completion
    )


# --- (c) SIGTERM with requests in flight --------------------------------------


def _patch_async_llm_shutdown() -> None:
    """Release every in-flight request when the engine client shuts down.

    Why: on SIGTERM with vLLM's default ``--shutdown-timeout 0``, vLLM 0.32's
    ``AsyncLLM.shutdown`` kills the engine core, then cancels both the task that
    reads the engine's output socket (which queues an ``EngineDeadError`` for
    the output handler) and the output handler itself. When the handler is
    cancelled before it dequeues that error (a race: lost in 4 of 5 runs of
    ``tests/test_faults.py`` on the CPU build without this), no in-flight
    stream is ever told: each waits forever, uvicorn waits for their
    connections to close ("Waiting for connections to close"), and the server
    never exits until SIGKILL (``docker stop`` then reports 137). After vLLM's
    own shutdown this hands the same ``EngineDeadError`` to every request still
    open, on the event loop, so each stream ends with vLLM's usual error event
    and the process exits 0. Nothing happens when no request is in flight
    (e.g. after a ``--shutdown-timeout`` drain); a request the handler already
    failed just gets the same error again, which its stream never reads.
    """
    from vllm.utils.async_utils import run_in_loop
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.exceptions import EngineDeadError

    original = AsyncLLM.shutdown

    @functools.wraps(original)
    def shutdown_releasing_requests(self, *args, **kwargs):
        handler = getattr(self, "output_handler", None)
        model_config = getattr(self, "model_config", None)
        original(self, *args, **kwargs)
        if handler is None or model_config is None or not _is_trio_model(model_config):
            return
        if getattr(self, "_trio_requests_released", False):
            return  # vLLM's server calls shutdown twice
        self._trio_requests_released = True
        loop = handler.get_loop()
        if loop.is_closed():
            return

        def release() -> None:
            processor = getattr(self, "output_processor", None)
            pending = 0 if processor is None else len(processor.request_states)
            if pending:
                logger.warning(
                    "vllm-trio: engine stopped with %d request(s) in flight; ending them "
                    "with EngineDeadError",
                    pending,
                )
                processor.propagate_error(EngineDeadError())

        run_in_loop(loop, release)

    AsyncLLM.shutdown = shutdown_releasing_requests  # type: ignore[method-assign]
