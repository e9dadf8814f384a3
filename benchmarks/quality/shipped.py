"""The scene model that ships in ``benchmarks/quality/model``: where it is, its
training record, the scene generator it was trained on, and the eval questions
the demo and the Docker test ask it.

One place for these, so that shipping a retrained model (possibly of another
generator) changes the model directory and this module, not every caller.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

MODEL_DIR = Path(__file__).resolve().parent / "model"

#: Eval-split questions (indices) that ``scripts/demo.py`` and
#: ``tests/test_docker_image.py`` ask the shipped model; vLLM with the plugin
#: answers each correctly at keep ratios 1 and 0.111 (the Docker test checks
#: it) and, measured when they were chosen, at 0.25.
DEMO_SAMPLES: tuple[int, ...] = (0, 1, 5)


def training_record(model_dir: Path = MODEL_DIR) -> dict[str, Any]:
    """``model_dir``'s TRAINING.json; a clear error where it was never trained."""
    marker = model_dir / "TRAINING.json"
    if not marker.is_file():
        raise FileNotFoundError(f"{model_dir} has no TRAINING.json (not a trained scene model)")
    return json.loads(marker.read_text())


def scene_generator(training: dict[str, Any]) -> ModuleType:
    """The scene module a checkpoint was trained on (its TRAINING.json ``generator``).

    The first scene model predates the field: ``benchmarks.quality.scenes``.
    """
    return importlib.import_module(training.get("generator", "benchmarks.quality.scenes"))


def generator_name(model_dir: Path = MODEL_DIR) -> str | None:
    """The name of the scene module ``model_dir`` was trained on; None where it
    holds no trained model (tests of one generation's model skip on another's)."""
    try:
        return scene_generator(training_record(model_dir)).__name__
    except FileNotFoundError:
        return None


def demo_samples(model_dir: Path = MODEL_DIR) -> list[Any]:
    """The ``DEMO_SAMPLES`` eval questions of the generator ``model_dir`` was trained on."""
    generator = scene_generator(training_record(model_dir))
    return [generator.make_sample("eval", i) for i in DEMO_SAMPLES]
