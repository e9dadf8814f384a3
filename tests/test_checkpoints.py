"""Locally built checkpoints: HF loading, tokenizer, chat template, processor, rebuild.

No vLLM engine here (fast). That vLLM loads the same directory with every
weight, and agrees with HF on logits, is covered by the engine tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_image
from safetensors import safe_open
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    LlavaNextForConditionalGeneration,
)

from trio_dev.checkpoints import (
    DEFAULT_SYSTEM_PROMPT,
    IMAGE_TOKEN,
    MARKER_NAME,
    PRESETS,
    build_checkpoint,
    build_processor,
    build_tokenizer,
    checkpoint_key,
    is_complete_checkpoint,
    main,
)

QUESTION = "What colour is the circle?"


def _user_turn(text: str = QUESTION, image: object | None = None) -> list[dict]:
    image_part: dict = {"type": "image"} if image is None else {"type": "image", "image": image}
    return [{"role": "user", "content": [image_part, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def hf_model(tiny_ckpt: Path) -> LlavaNextForConditionalGeneration:
    model, info = LlavaNextForConditionalGeneration.from_pretrained(
        tiny_ckpt, output_loading_info=True
    )
    assert {k: v for k, v in info.items() if v} == {}, info
    return model.eval()


def test_hf_loads_without_missing_keys_and_runs(
    tiny_ckpt: Path, hf_model: LlavaNextForConditionalGeneration
) -> None:
    # The fixture already asserted: no missing, unexpected or mismatched keys.
    assert hf_model.config.architectures == ["LlavaNextForConditionalGeneration"]
    processor = AutoProcessor.from_pretrained(tiny_ckpt)
    inputs = processor.apply_chat_template(
        _user_turn(image=make_image(0)),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        logits = hf_model(**inputs).logits
    seq_len = inputs["input_ids"].shape[1]
    assert logits.shape == (1, seq_len, hf_model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()

    # Random weights, but scaled so greedy decoding does not collapse.
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert len(set(out[0, seq_len:].tolist())) >= 4


def test_logits_depend_on_image(
    tiny_ckpt: Path, hf_model: LlavaNextForConditionalGeneration
) -> None:
    processor = AutoProcessor.from_pretrained(tiny_ckpt)
    last = []
    for seed in (0, 1):
        inputs = processor.apply_chat_template(
            _user_turn(image=make_image(seed)),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            last.append(hf_model(**inputs).logits[0, -1])
    assert (last[0] - last[1]).abs().max() > 0.1


def test_weights_use_llava_hf_layout(tiny_ckpt: Path) -> None:
    """vLLM 0.32 maps these names; transformers 5's own save names it cannot."""
    with safe_open(tiny_ckpt / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    prefixes = (
        "language_model.model.",
        "language_model.lm_head.",
        "vision_tower.vision_model.",
        "multi_modal_projector.",
    )
    assert all(k.startswith(prefixes) or k == "image_newline" for k in keys), sorted(
        k for k in keys if not k.startswith(prefixes)
    )
    assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in keys
    assert "language_model.lm_head.weight" in keys  # untied
    assert "image_newline" in keys


def test_checkpoint_key_mapping() -> None:
    assert (
        checkpoint_key("model.vision_tower.encoder.layers.0.mlp.fc1.weight")
        == "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    )
    assert (
        checkpoint_key("model.language_model.layers.3.self_attn.q_proj.weight")
        == "language_model.model.layers.3.self_attn.q_proj.weight"
    )
    assert checkpoint_key("lm_head.weight") == "language_model.lm_head.weight"
    assert checkpoint_key("model.image_newline") == "image_newline"
    with pytest.raises(ValueError, match="unexpected parameter"):
        checkpoint_key("something.else")


@pytest.mark.parametrize(
    "text",
    [
        "What colour is the circle in the top left corner?",
        "How many   squares?\nThree, maybe 42.",
        " leading space, trailing space ",
        "Ünïcödé, emoji 😀 and zebra-like unknown words: qwxz",
        "USER: hello ASSISTANT: hi",
    ],
)
def test_tokenizer_round_trips(tiny_ckpt: Path, text: str) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id == 1
    assert ids.count(tok.bos_token_id) == 1
    assert tok.eos_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids[1:]) == text


def test_tokenizer_vocab_and_common_words(tiny_ckpt: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    assert len(tok) == PRESETS["tiny"].vocab_size == 1024
    # Words of the scene vocabulary are single tokens (with their leading space).
    for word in (" red", " circle", " square", " left", " three", " colour"):
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word


def test_image_token_id_matches_config(tiny_ckpt: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    processor = AutoProcessor.from_pretrained(tiny_ckpt)
    config = json.loads((tiny_ckpt / "config.json").read_text())
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id == config["image_token_index"] == processor.image_token_id
    assert tok(IMAGE_TOKEN, add_special_tokens=False).input_ids == [image_id]
    assert tok("<image>\nhi", add_special_tokens=False).input_ids[0] == image_id
    assert IMAGE_TOKEN in tok.all_special_tokens


def test_chat_template(tiny_ckpt: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    processor = AutoProcessor.from_pretrained(tiny_ckpt)
    expected = f"<s>{DEFAULT_SYSTEM_PROMPT} USER: <image>\n{QUESTION} ASSISTANT:"
    # vLLM's "openai" content format, and HF's processor format.
    for render in (tok.apply_chat_template, processor.apply_chat_template):
        assert render(_user_turn(), tokenize=False, add_generation_prompt=True) == expected

    # Raw OpenAI parts, system message, multi-turn, text before image.
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look."},
                {"type": "image_url", "image_url": {"url": "data:,"}},
                {"type": "text", "text": "Count the squares."},
            ],
        },
        {"role": "assistant", "content": "Three."},
        {"role": "user", "content": "And circles?"},
    ]
    assert (
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        == "<s>Be brief. USER: <image>\nLook. Count the squares. ASSISTANT: Three.</s>"
        "USER: And circles? ASSISTANT:"
    )
    # Plain-string content passes through (vLLM's "string" content format).
    assert tok.apply_chat_template(
        [{"role": "user", "content": "<image>\nHi"}], tokenize=False
    ) == (f"<s>{DEFAULT_SYSTEM_PROMPT} USER: <image>\nHi")


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((112, 112), 88),  # 2x2 tiles: 16 base + 8 rows x (8 + newline)
        ((112, 56), 52),  # 1x2 tiles (wide): 16 + 4 x (8 + 1)
        ((56, 112), 56),  # 2x1 tiles (tall): 16 + 8 x (4 + 1)
        ((56, 56), 36),
    ],
)
def test_processor_image_token_count(tiny_ckpt: Path, size: tuple[int, int], expected: int) -> None:
    processor = AutoProcessor.from_pretrained(tiny_ckpt)
    inputs = processor.apply_chat_template(
        _user_turn(image=make_image(0, size)),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(processor.image_token_id) == expected
    assert ids.count(1) == 1 and ids[0] == 1  # BOS from the template, not doubled


def test_bench_processor_gives_7b_token_count() -> None:
    """A 672x672 image is 2,928 visual tokens in LLaVA-NeXT-7B; bench keeps that."""
    spec = PRESETS["bench"]
    assert spec.num_hidden_layers == 32
    processor = build_processor(spec, build_tokenizer(spec))
    inputs = processor(
        images=make_image(0, (672, 672)),
        text="USER: <image>\nHi ASSISTANT:",
        return_tensors="pt",
    )
    assert inputs["input_ids"][0].tolist().count(processor.image_token_id) == 2928


def test_build_is_idempotent_and_deterministic(tmp_path: Path, tiny_ckpt: Path) -> None:
    out = tmp_path / "ckpt"
    assert build_checkpoint(out, preset="tiny", seed=0) == out.resolve()
    assert is_complete_checkpoint(out, "tiny", 0)
    assert not is_complete_checkpoint(out, "tiny", 1)
    marker = json.loads((out / MARKER_NAME).read_text())
    assert (marker["preset"], marker["seed"]) == ("tiny", 0)

    # Same seed, another directory: byte-identical files.
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (out / name).read_bytes() == (tiny_ckpt / name).read_bytes(), name

    # Second build (API and CLI) returns without touching anything.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert build_checkpoint(out, preset="tiny", seed=0) == out.resolve()
    assert main(["--out", str(out), "--preset", "tiny", "--seed", "0"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes

    # Another seed refuses to clobber unless asked to.
    with pytest.raises(FileExistsError):
        build_checkpoint(out, preset="tiny", seed=1)
    build_checkpoint(out, preset="tiny", seed=1, overwrite=True)
    assert is_complete_checkpoint(out, "tiny", 1)
    assert (out / "model.safetensors").read_bytes() != (
        tiny_ckpt / "model.safetensors"
    ).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging


def test_build_refuses_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(FileExistsError):
        build_checkpoint(tmp_path, preset="tiny")
    assert (tmp_path / "notes.txt").exists()
    with pytest.raises(ValueError, match="unknown preset"):
        build_checkpoint(tmp_path / "x", preset="huge")
