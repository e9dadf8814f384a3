"""Refuse ``vllm_xargs.keep_ratio: true`` (pydantic would turn it into ratio 1)."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

from . import Patch, is_trio_model

_CHAT = "vllm.entrypoints.openai.chat_completion.serving"
_COMPLETION = "vllm.entrypoints.openai.completion.serving"


def refuse_bool_ratio(method: Callable[..., Any]) -> Callable[..., Any]:
    from ..requests.keep_ratio import (
        XARGS_KEEP_RATIO,
        bool_keep_ratio_error,
        coerced_bool_candidate,
        raw_keep_ratio_is_bool,
    )

    @functools.wraps(method)
    async def wrapper(self, request, raw_request=None, *args, **kwargs):
        # Only an integer 0 or 1 can be a coerced bool: the body is re-read
        # for those alone, so ordinary requests pay nothing.
        if (
            coerced_bool_candidate(request)
            and raw_request is not None
            and is_trio_model(self.model_config)
            and await raw_keep_ratio_is_bool(raw_request)
        ):
            raise bool_keep_ratio_error(request.vllm_xargs[XARGS_KEEP_RATIO])
        return await method(self, request, raw_request, *args, **kwargs)

    return wrapper


def _wrapping(module: str, cls: str, method: str) -> Callable[[], None]:
    def install() -> None:
        owner = getattr(importlib.import_module(module), cls)
        setattr(owner, method, refuse_bool_ratio(getattr(owner, method)))

    return install


_WHY = (
    "vLLM types vllm_xargs values as str | int | float, so JSON true arrives as 1; "
    "only the raw body shows the client sent a bool"
)
_REMOVE_WHEN = "vLLM keeps bools in vllm_xargs (or lets a plugin declare typed xargs)"

PATCHES = (
    Patch(
        name="serving_chat",
        module=_CHAT,
        targets=(f"{_CHAT}.OpenAIServingChat.create_chat_completion",),
        why=_WHY,
        remove_when=_REMOVE_WHEN,
        install=_wrapping(_CHAT, "OpenAIServingChat", "create_chat_completion"),
    ),
    Patch(
        name="serving_completion",
        module=_COMPLETION,
        targets=(f"{_COMPLETION}.OpenAIServingCompletion.create_completion",),
        why=_WHY,
        remove_when=_REMOVE_WHEN,
        install=_wrapping(_COMPLETION, "OpenAIServingCompletion", "create_completion"),
    ),
)
