"""lmms-eval task functions for the scene eval split (``lmms_eval_run.py`` copies this
file next to the task YAML as ``utils.py``, where ``!function utils.*`` finds it).

The score is the harness's: ``normalize_answer`` of the generated text equals
the expected word, so lmms-eval's accuracy and the harness's count the same
answers as right.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from benchmarks.quality.grid_scenes import normalize_answer


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The bare question: the server's chat template adds the rest, as for the harness."""
    return doc["question"]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"accuracy": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}
