"""vllm-trio's log records go through vLLM's own handler (its format and level)."""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm_trio")


class _VllmLogHandler(logging.Handler):
    """Hands each record to vLLM's ``vllm`` logger, as configured at that moment."""

    def emit(self, record: logging.LogRecord) -> None:
        vllm_logger = logging.getLogger("vllm")
        (vllm_logger if vllm_logger.handlers else logging.getLogger()).handle(record)


def log_through_vllm() -> None:
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
