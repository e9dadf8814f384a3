"""Media-loading failures that are the client's doing: 400, not 500."""

from __future__ import annotations


def media_client_error(exc: BaseException) -> Exception | None:
    """A 400 for deterministic media-loading failures that vLLM reports as 500.

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
