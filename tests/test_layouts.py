"""Layouts TRIO cannot serve are refused where the engine config is built.

``EngineArgs.create_engine_config`` is what ``vllm serve`` and ``LLM(...)`` run
in the caller's process before any engine or worker starts; TRIO's
per-architecture config hook must refuse there, with TRIO's reason, and leave
the same layouts alone for stock serving.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import vllm_trio
from trio_dev.checkpoints import build_checkpoint
from vllm_trio.config import FAMILIES
from vllm_trio.layout import check_text_backbone


def engine_config(model: Path, trio: bool, **kwargs: Any):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_trio.plugin import register

    register()
    extra = vllm_trio.engine_kwargs() if trio else {}
    args = EngineArgs(model=str(model), max_model_len=1024, enforce_eager=True, **kwargs, **extra)
    return args.create_engine_config()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"enable_lora": True}, r"--enable-lora is not supported with --plugin trio"),
        ({"quantization": "fp8"}, r"quantized checkpoints \(fp8\) are not supported"),
    ],
)
def test_refused_with_trios_reason(tiny_ckpt: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(Exception, match=message):
        engine_config(tiny_ckpt, trio=True, **kwargs)


def test_lora_layout_stays_stock_without_trio(tiny_ckpt: Path) -> None:
    config = engine_config(tiny_ckpt, trio=False, enable_lora=True)
    assert config.lora_config is not None


def test_supported_layout_builds(tiny_ckpt: Path) -> None:
    config = engine_config(tiny_ckpt, trio=True)
    assert config.model_config.hf_config.architectures == ["TrioLlavaNextForConditionalGeneration"]


def test_text_backbone_allowlist() -> None:
    class Text:
        model_type = "gemma"
        max_position_embeddings = 4096

    class Config:
        text_config = Text()

    with pytest.raises(ValueError, match=r"text backbone 'gemma' is not supported"):
        check_text_backbone(Config())
    Text.model_type = "mistral"
    Text.sliding_window = 1024
    with pytest.raises(ValueError, match="sliding-window attention"):
        check_text_backbone(Config())
    Text.sliding_window = None
    check_text_backbone(Config())
    llava = FAMILIES["LlavaNextForConditionalGeneration"]
    assert {"llama", "mistral", "qwen2"} <= llava.text_model_types


def test_other_architecture_refused_before_any_engine(tmp_path: Path) -> None:
    """A checkpoint of an architecture TRIO does not serve (here: a LLaVA-NeXT
    config relabelled as LLaVA-1.5) fails while the model config is built,
    naming the families TRIO serves."""
    import json
    import shutil

    src = build_checkpoint(tmp_path / "ckpt", preset="tiny")
    other = tmp_path / "other"
    shutil.copytree(src, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"] = ["LlavaForConditionalGeneration"]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match=r"--plugin trio serves LLaVA-NeXT"):
        engine_config(other, trio=True)
