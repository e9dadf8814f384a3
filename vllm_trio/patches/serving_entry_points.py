"""Refuse ``vllm_xargs.keep_ratio: true`` (pydantic would turn it into ratio 1)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from . import Patch, is_trio_model


def _install() -> None:
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion

    from ..requests.keep_ratio import (
        XARGS_KEEP_RATIO,
        bool_keep_ratio_error,
        coerced_bool_candidate,
        raw_keep_ratio_is_bool,
    )

    def refuse_bool_ratio(method: Callable[..., Any]) -> Callable[..., Any]:
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

    OpenAIServingChat.create_chat_completion = refuse_bool_ratio(  # type: ignore[method-assign]
        OpenAIServingChat.create_chat_completion
    )
    OpenAIServingCompletion.create_completion = refuse_bool_ratio(  # type: ignore[method-assign]
        OpenAIServingCompletion.create_completion
    )


PATCH = Patch(
    name="serving_entry_points",
    targets=(
        "vllm.entrypoints.openai.chat_completion.serving.OpenAIServingChat.create_chat_completion",
        "vllm.entrypoints.openai.completion.serving.OpenAIServingCompletion.create_completion",
    ),
    why="vLLM types vllm_xargs values as str | int | float, so JSON true arrives as 1; "
    "only the raw body shows the client sent a bool",
    remove_when="vLLM keeps bools in vllm_xargs (or lets a plugin declare typed xargs)",
    install=_install,
)
