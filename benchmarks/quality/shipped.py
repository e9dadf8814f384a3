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
#: it) and, measured on the v9 model, at 0.25 too, at depth 2 and at depth 3.
DEMO_SAMPLES: tuple[int, ...] = (0, 1, 5)


def training_record(model_dir: Path = MODEL_DIR) -> dict[str, Any]:
    """``model_dir``'s TRAINING.json; a clear error where it was never trained."""
    marker = model_dir / "TRAINING.json"
    if not marker.is_file():
        raise FileNotFoundError(f"{model_dir} has no TRAINING.json (not a trained scene model)")
    return json.loads(marker.read_text())


def scene_generator(training: dict[str, Any]) -> ModuleType:
    """The scene module a checkpoint was trained on (its TRAINING.json ``generator``).

    The first scene model's records had none; its scene module was removed with
    it (it is in git at commit 168e76f).
    """
    if "generator" not in training:
        raise ValueError(
            "TRAINING.json names no scene generator: a first-generation scene model, "
            "whose scenes (benchmarks/quality/scenes.py) were removed after commit 168e76f"
        )
    return importlib.import_module(training["generator"])


def generator_name(model_dir: Path = MODEL_DIR) -> str | None:
    """The name of the scene module ``model_dir`` was trained on; None where it
    holds no trained model (tests of one generation's model skip on another's)."""
    try:
        return scene_generator(training_record(model_dir)).__name__
    except FileNotFoundError:
        return None


def reading_layer(model_dir: Path = MODEL_DIR) -> int | None:
    """The decoder layer at which ``model_dir``'s answer position reads the image,
    or None where training did not place it.

    The grid-scenes model's attention at ``config.attn_layer`` is supervised onto
    each question's evidence tokens, so that is where it looks them up. TRIO
    scored there keeps them: at depth 3 of the shipped model, keep ratio
    0.111, every evidence token survives for 99.8% of the questions against
    77.7% at the plugin's default depth 2, and accuracy is 98.2% of unpruned
    against 91.0% (``benchmarks/results/trio_diagnosis.md`` and
    ``quality.md``, README "Quality"). The demo serves at this depth.
    """
    return training_record(model_dir).get("config", {}).get("attn_layer")


def demo_samples(model_dir: Path = MODEL_DIR) -> list[Any]:
    """The ``DEMO_SAMPLES`` eval questions of the generator ``model_dir`` was trained on."""
    generator = scene_generator(training_record(model_dir))
    return [generator.make_sample("eval", i) for i in DEMO_SAMPLES]
