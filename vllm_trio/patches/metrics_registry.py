"""TRIO's metrics on the registry vLLM's ``/metrics`` serves."""

from __future__ import annotations

import functools
import os

from . import Patch


def _install() -> None:
    from vllm.entrypoints.serve.instrumentator import metrics as instrumentator

    from ..metrics import METRICS_DIR_ENV, register_collector

    original = instrumentator.get_prometheus_registry

    @functools.wraps(original)
    def registry_with_trio():
        registry = original()
        if os.environ.get(METRICS_DIR_ENV):  # set only by `--plugin trio`
            register_collector(registry)
        return registry

    instrumentator.get_prometheus_registry = registry_with_trio


PATCH = Patch(
    name="metrics_registry",
    module="vllm.entrypoints.serve.instrumentator.metrics",
    targets=("vllm.entrypoints.serve.instrumentator.metrics.get_prometheus_registry",),
    why="vLLM builds the registry /metrics serves (a fresh multiprocess one with several "
    "API servers) with no hook for a plugin's collector",
    remove_when="vLLM lets plugins register Prometheus collectors on the served registry",
    install=_install,
)
