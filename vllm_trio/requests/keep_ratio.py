"""The per-request keep ratio on the OpenAI API: ``vllm_xargs.keep_ratio``.

A request may choose its own fraction of visual tokens,
``extra_body={"vllm_xargs": {"keep_ratio": r}}``; offline, and as an
alternative online, ``mm_processor_kwargs={"trio_keep_ratio": r}``. Every
invalid value is the client's error and becomes a 400 naming the field.
"""

from __future__ import annotations

import difflib
import json
import re
from typing import Any

from ..core.budget import validate_keep_ratio

#: The per-request field on the OpenAI API.
XARGS_KEEP_RATIO = "keep_ratio"
#: The processor kwarg that carries the ratio to the multimodal processor.
KEEP_RATIO_KWARG = "trio_keep_ratio"


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


def check_mm_processor_kwarg(mm_kwargs: dict[str, Any]) -> None:
    """400 for an invalid ``mm_processor_kwargs.trio_keep_ratio``."""
    if KEEP_RATIO_KWARG not in mm_kwargs:
        return
    from vllm.exceptions import VLLMValidationError

    field = f"mm_processor_kwargs.{KEEP_RATIO_KWARG}"
    try:
        validate_keep_ratio(mm_kwargs[KEEP_RATIO_KWARG], field)
    except ValueError as exc:
        raise VLLMValidationError(str(exc), parameter=field) from exc


def apply_request_keep_ratio(request: Any) -> None:
    """Validate the request's ratio fields and hand ``vllm_xargs.keep_ratio`` to
    the processor as ``mm_processor_kwargs.trio_keep_ratio`` (400 on bad input)."""
    ratio = keep_ratio_from_request(request)
    mm_kwargs = dict(getattr(request, "mm_processor_kwargs", None) or {})
    check_mm_processor_kwarg(mm_kwargs)
    if ratio is not None:
        mm_kwargs[KEEP_RATIO_KWARG] = ratio
        request.mm_processor_kwargs = mm_kwargs


def coerced_bool_candidate(request: Any) -> bool:
    """Whether ``vllm_xargs.keep_ratio`` is an integer 0 or 1, the only values a
    JSON ``true``/``false`` can have become (see :func:`raw_keep_ratio_is_bool`)."""
    value = (getattr(request, "vllm_xargs", None) or {}).get(XARGS_KEEP_RATIO)
    return type(value) is int and value in (0, 1)


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


def bool_keep_ratio_error(value: Any) -> Exception:
    from vllm.exceptions import VLLMValidationError

    field = f"vllm_xargs.{XARGS_KEEP_RATIO}"
    return VLLMValidationError(
        f"{field} must be a number in (0, 1], got bool {bool(value)!r}",
        parameter=field,
        value=bool(value),
    )
