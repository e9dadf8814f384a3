"""``vllm_xargs.keep_ratio`` reaches the multimodal processor; media errors become 400s."""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from typing import Any

from . import Patch, is_trio_model

#: Set while a TRIO model's request is being preprocessed (same task, same
#: process), so the kwargs-trust check skips TRIO's own validated key only
#: then; every other model's requests see vLLM's check unchanged.
_trio_request = contextvars.ContextVar("vllm_trio_request", default=False)


def _install() -> None:
    from vllm.renderers import online_renderer
    from vllm.renderers.online_renderer import OnlineRenderer

    from ..requests.keep_ratio import KEEP_RATIO_KWARG, apply_request_keep_ratio
    from ..requests.media import media_client_error

    original_validate = online_renderer.validate_request_mm_kwargs

    @functools.wraps(original_validate)
    def validate_without_trio_key(*, mm_processor_kwargs, **kwargs):
        if _trio_request.get() and mm_processor_kwargs:
            # TRIO's key was validated by the bridge; only the rest needs trust.
            rest = {k: v for k, v in mm_processor_kwargs.items() if k != KEEP_RATIO_KWARG}
            mm_processor_kwargs = rest or None
        return original_validate(mm_processor_kwargs=mm_processor_kwargs, **kwargs)

    def bridge(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        async def wrapper(self, request, *args, **kwargs):
            if not is_trio_model(self.model_config):
                return await method(self, request, *args, **kwargs)
            apply_request_keep_ratio(request)
            token = _trio_request.set(True)
            try:
                return await method(self, request, *args, **kwargs)
            except Exception as exc:
                client_error = media_client_error(exc)
                if client_error is None:
                    raise
                raise client_error from exc
            finally:
                _trio_request.reset(token)

        return wrapper

    online_renderer.validate_request_mm_kwargs = validate_without_trio_key
    OnlineRenderer.preprocess_chat = bridge(OnlineRenderer.preprocess_chat)  # type: ignore[method-assign]
    OnlineRenderer.preprocess_cmpl = bridge(OnlineRenderer.preprocess_cmpl)  # type: ignore[method-assign]


PATCH = Patch(
    name="online_renderer",
    module="vllm.renderers.online_renderer",
    targets=(
        "vllm.renderers.online_renderer.OnlineRenderer.preprocess_chat",
        "OnlineRenderer.preprocess_cmpl",
        "vllm.renderers.online_renderer.validate_request_mm_kwargs",
    ),
    why="a validated per-request keep ratio (vllm_xargs.keep_ratio) must choose the "
    "request's multimodal processing without --trust-request-mm-kwargs, and "
    "deterministic media failures (decompression bomb, refused file://) are 400s",
    remove_when="vLLM routes validated vllm_xargs to mm_processor_kwargs per model, and "
    "maps those media errors to 400",
    install=_install,
)
