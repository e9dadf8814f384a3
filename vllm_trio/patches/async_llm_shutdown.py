"""End every in-flight request when the engine client shuts down (SIGTERM hang).

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

from __future__ import annotations

import functools
import logging

from . import Patch, is_trio_model

logger = logging.getLogger("vllm_trio")


def _install() -> None:
    from vllm.utils.async_utils import run_in_loop
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.exceptions import EngineDeadError

    original = AsyncLLM.shutdown

    @functools.wraps(original)
    def shutdown_releasing_requests(self, *args, **kwargs):
        handler = getattr(self, "output_handler", None)
        model_config = getattr(self, "model_config", None)
        original(self, *args, **kwargs)
        if handler is None or model_config is None or not is_trio_model(model_config):
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


PATCH = Patch(
    name="async_llm_shutdown",
    module="vllm.v1.engine.async_llm",
    targets=("vllm.v1.engine.async_llm.AsyncLLM.shutdown",),
    why="vLLM 0.32/0.33 can cancel the output handler before it tells open streams the "
    "engine died; they then wait forever and the server never exits on SIGTERM",
    remove_when="vLLM's AsyncLLM.shutdown fails in-flight requests itself (still racy in 0.33.0)",
    install=_install,
)
