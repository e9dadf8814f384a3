"""TRIO's Prometheus metrics on the server's ``/metrics``, in vLLM's naming style.

- ``vllm:trio_image_visual_tokens{stage="before"|"after"}``: visual tokens per
  image before and after pruning (histogram; ``_sum`` gives the totals);
- ``vllm:trio_keep_ratio``: the keep ratio each image was served with;
- ``vllm:trio_side_pass_seconds``: wall time of one image's side pass
  (context, layers 0..L, gradient, NMS); images scored in one batched pass
  each record their context time plus the batch's time over its images.

Labels: ``model_name`` (and ``stage``), nothing per request, so series never
explode. Why a collector of our own instead of ``prometheus_client`` metrics:
the image counts are taken in the API-server process (the multimodal
processor) but the side pass runs in the engine's worker process, and vLLM
only aggregates metrics across processes in its multi-API-server mode. Each
process keeps its TRIO statistics in memory and, on a TRIO server, mirrors them
to one small JSON file per process in a directory the ``vllm serve`` process
creates before it starts any engine (children inherit
``VLLM_TRIO_METRICS_DIR``); the collector on the registry vLLM exposes sums
them on each scrape. Without that directory (offline ``LLM``) nothing is
written.
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

METRICS_DIR_ENV = "VLLM_TRIO_METRICS_DIR"

#: name -> (help, bucket upper bounds, label names)
METRICS: dict[str, tuple[str, tuple[float, ...], tuple[str, ...]]] = {
    "vllm:trio_image_visual_tokens": (
        "Visual tokens per image before and after TRIO pruning.",
        (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384),
        ("model_name", "stage"),
    ),
    "vllm:trio_keep_ratio": (
        "Keep ratio each image was served with (fraction of its visual tokens kept).",
        (0.05, 0.1, 0.111, 0.2, 0.222, 0.25, 0.333, 0.5, 0.75, 1.0),
        ("model_name",),
    ),
    "vllm:trio_side_pass_seconds": (
        "Wall time of one image's TRIO side pass (context, layers 0..L, gradient, NMS); "
        "images scored in one batched pass each count an equal share of its time.",
        (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        ("model_name",),
    ),
}

_lock = threading.Lock()
#: (metric, label values) -> [bucket counts..., +Inf count, sum]
_state: dict[tuple[str, tuple[str, ...]], list[float]] = {}
_owned_dir: str | None = None


def enable_cross_process() -> None:
    """Create the per-server statistics directory (``vllm serve`` process, before
    any engine or API-server child starts; they inherit the variable)."""
    global _owned_dir
    if _owned_dir is not None:
        return
    # Always this server's own directory, even if one was inherited: two
    # servers must never sum each other's statistics.
    _owned_dir = tempfile.mkdtemp(prefix="vllm-trio-metrics-")
    os.environ[METRICS_DIR_ENV] = _owned_dir
    atexit.register(shutil.rmtree, _owned_dir, True)


def observe(metric: str, value: float, labels: Sequence[str]) -> None:
    """Add one observation to this process's statistics."""
    bounds = METRICS[metric][1]
    key = (metric, tuple(labels))
    with _lock:
        row = _state.setdefault(key, [0.0] * (len(bounds) + 2))
        row[bisect.bisect_left(bounds, value)] += 1
        row[-1] += value
        snapshot = _encode(_state)
    _mirror(snapshot)


def record_image(model_name: str, num_tokens: int, num_kept: int, ratio: float) -> None:
    observe("vllm:trio_image_visual_tokens", num_tokens, (model_name, "before"))
    observe("vllm:trio_image_visual_tokens", num_kept, (model_name, "after"))
    observe("vllm:trio_keep_ratio", ratio, (model_name,))


def _encode(state: dict[tuple[str, tuple[str, ...]], list[float]]) -> str:
    return json.dumps([[m, list(labels), row] for (m, labels), row in state.items()])


def _mirror(snapshot: str) -> None:
    directory = os.environ.get(METRICS_DIR_ENV)
    if not directory:
        return
    path = Path(directory) / f"{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    with contextlib.suppress(OSError):  # the server is shutting down
        tmp.write_text(snapshot)
        tmp.replace(path)


def _all_states() -> Iterator[dict[tuple[str, tuple[str, ...]], list[float]]]:
    with _lock:
        yield {k: list(v) for k, v in _state.items()}
    directory = os.environ.get(METRICS_DIR_ENV)
    if not directory:
        return
    for path in Path(directory).glob("*.json"):
        if path.stem == str(os.getpid()):
            continue  # this process's own statistics, read from memory above
        with contextlib.suppress(OSError, ValueError):
            rows = json.loads(path.read_text())
            yield {(m, tuple(labels)): row for m, labels, row in rows}


class TrioCollector:
    """A ``prometheus_client`` collector that sums every process's TRIO statistics."""

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator:
        from prometheus_client.core import HistogramMetricFamily

        totals: dict[tuple[str, tuple[str, ...]], list[float]] = {}
        for state in _all_states():
            for key, row in state.items():
                acc = totals.setdefault(key, [0.0] * len(row))
                for i, v in enumerate(row):
                    acc[i] += v
        for metric, (doc, bounds, label_names) in METRICS.items():
            family = HistogramMetricFamily(metric, doc, labels=list(label_names))
            for (name, labels), row in sorted(totals.items()):
                if name != metric:
                    continue
                cumulative, buckets = 0.0, []
                for bound, count in zip((*bounds, float("inf")), row[:-1], strict=True):
                    cumulative += count
                    buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
                family.add_metric(list(labels), buckets, row[-1])
            yield family


_collector = TrioCollector()


def register_collector(registry: object) -> None:
    """Expose TRIO's metrics on ``registry`` (once per registry)."""
    with contextlib.suppress(ValueError):  # already registered there
        registry.register(_collector)  # type: ignore[attr-defined]
