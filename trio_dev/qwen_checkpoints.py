"""Build small Qwen2.5-VL checkpoints locally, loadable by HF transformers and vLLM.

The Qwen2.5-VL counterpart of ``trio_dev.checkpoints`` (no model hub here):
a ``Qwen2_5_VLConfig`` with M-RoPE sections, seeded random weights, a
byte-level BPE tokenizer carrying Qwen's special tokens (``<|im_start|>``,
``<|vision_start|>``, ``<|image_pad|>``, ...), Qwen's chat template and the
``Qwen2VLImageProcessor`` / ``Qwen2VLVideoProcessor`` pair. The directory loads
in ``Qwen2_5_VLForConditionalGeneration.from_pretrained`` / ``AutoProcessor``
and in ``vllm.LLM(model=dir)`` with no missing or unexpected weights
(transformers 5 saves ``model.visual.*`` / ``model.language_model.*``, names
vLLM 0.32's ``hf_to_vllm_mapper`` maps).

Presets:

* ``qwen-tiny``: hidden 128, 4 decoder layers, head size 32 with
  ``mrope_section`` [4, 6, 6], a 2-block vision tower; a 224x224 image is 64
  visual tokens. For tests.
* ``qwen-bench``: Qwen2.5-VL-7B's proportions where they decide benchmark
  ratios (28 decoder layers, head size 128, ``mrope_section`` [16, 24, 24],
  grouped KV heads (4:1; the 7B has 28:4), the 7B's MLP ratio, 14-pixel
  patches merged 2x2), with a narrow width (512) and a shallow vision tower
  so a request takes seconds on a CPU; a 672x672 image is 576 visual tokens.

CLI: ``python -m trio_dev.qwen_checkpoints --out DIR [--preset qwen-tiny|qwen-bench]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .checkpoints import _CORPUS, _apply_umask, _finish_tokenizer_config

FORMAT_VERSION = 1
MARKER_NAME = "trio_checkpoint.json"

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VISION_PAD = "<|vision_pad|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
#: Order fixes the ids 0..7 (Qwen's real ids are past a 151k vocabulary).
SPECIAL_TOKENS = (
    ENDOFTEXT,
    IM_START,
    IM_END,
    VISION_START,
    VISION_END,
    VISION_PAD,
    IMAGE_PAD,
    VIDEO_PAD,
)

#: Qwen2-VL / Qwen2.5-VL's chat template (system default, one
#: ``<|vision_start|><|image_pad|><|vision_end|>`` per image part).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class QwenSpec:
    """Shape of a locally built Qwen2.5-VL checkpoint (field names as in its configs)."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    mrope_section: tuple[int, int, int]
    vision_hidden_size: int
    vision_depth: int
    vision_num_heads: int
    vision_intermediate_size: int
    fullatt_block_indexes: tuple[int, ...]
    max_position_embeddings: int = 4096
    vocab_size: int = 1024
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    tokens_per_second: int = 2
    #: Image processor bounds in pixels (Qwen resizes to multiples of 28 inside them).
    min_pixels: int = 28 * 28 * 4
    max_pixels: int = 28 * 28 * 1024
    text_init_std: float = 0.02
    dtype: str = "float32"


PRESETS: dict[str, QwenSpec] = {
    "qwen-tiny": QwenSpec(
        name="qwen-tiny",
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        mrope_section=(4, 6, 6),
        vision_hidden_size=32,
        vision_depth=2,
        vision_num_heads=2,
        vision_intermediate_size=64,
        fullatt_block_indexes=(1,),
        max_pixels=28 * 28 * 256,
        # Same reason as the LLaVA tiny preset: 0.02 leaves near-tied logits.
        text_init_std=0.25,
    ),
    "qwen-bench": QwenSpec(
        name="qwen-bench",
        # Qwen2.5-VL-7B: 28 layers, 28 heads of 128 (4 KV heads), MLP 18944/3584.
        hidden_size=512,
        num_hidden_layers=28,
        num_attention_heads=4,
        num_key_value_heads=1,
        intermediate_size=2706,
        mrope_section=(16, 24, 24),
        vision_hidden_size=256,
        vision_depth=4,
        vision_num_heads=4,
        vision_intermediate_size=512,
        fullatt_block_indexes=(3,),
        text_init_std=0.1,
    ),
}


def build_tokenizer(spec: QwenSpec):
    """Byte-level BPE with Qwen's special tokens; no BOS (Qwen adds none)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens={
            "image_token": IMAGE_PAD,
            "video_token": VIDEO_PAD,
            "vision_bos_token": VISION_START,
            "vision_eos_token": VISION_END,
        },
        clean_up_tokenization_spaces=False,
        model_max_length=spec.max_position_embeddings,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.convert_tokens_to_ids(token) != expected_id:
            raise RuntimeError(f"special token {token!r} did not get id {expected_id}")
    return tokenizer


def build_processor(spec: QwenSpec, tokenizer):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    common = dict(
        patch_size=spec.patch_size,
        merge_size=spec.spatial_merge_size,
        temporal_patch_size=spec.temporal_patch_size,
    )
    pixels = {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=pixels, **common),
        video_processor=Qwen2VLVideoProcessor(size=pixels, **common),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(spec: QwenSpec):
    from transformers import Qwen2_5_VLConfig

    ids = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=spec.vocab_size,
            hidden_size=spec.hidden_size,
            num_hidden_layers=spec.num_hidden_layers,
            num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_key_value_heads,
            intermediate_size=spec.intermediate_size,
            max_position_embeddings=spec.max_position_embeddings,
            rms_norm_eps=spec.rms_norm_eps,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": spec.rope_theta,
                "mrope_section": list(spec.mrope_section),
            },
            initializer_range=spec.text_init_std,
            max_window_layers=spec.num_hidden_layers,
            use_sliding_window=False,
            bos_token_id=ids[ENDOFTEXT],
            eos_token_id=ids[IM_END],
            pad_token_id=ids[ENDOFTEXT],
            tie_word_embeddings=False,
            dtype=spec.dtype,
        ),
        vision_config=dict(
            depth=spec.vision_depth,
            hidden_size=spec.vision_hidden_size,
            intermediate_size=spec.vision_intermediate_size,
            num_heads=spec.vision_num_heads,
            out_hidden_size=spec.hidden_size,
            patch_size=spec.patch_size,
            spatial_merge_size=spec.spatial_merge_size,
            temporal_patch_size=spec.temporal_patch_size,
            window_size=spec.window_size,
            fullatt_block_indexes=list(spec.fullatt_block_indexes),
            tokens_per_second=spec.tokens_per_second,
            dtype=spec.dtype,
        ),
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=False,
        dtype=spec.dtype,
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return config


def _marker(spec: QwenSpec, seed: int) -> dict[str, Any]:
    spec_json = json.loads(json.dumps(asdict(spec)))
    return {"format_version": FORMAT_VERSION, "preset": spec.name, "seed": seed, "spec": spec_json}


def is_complete(out_dir: Path, spec: QwenSpec, seed: int) -> bool:
    try:
        return json.loads((out_dir / MARKER_NAME).read_text()) == _marker(spec, seed)
    except (OSError, ValueError):
        return False


def _write(spec: QwenSpec, seed: int, out_dir: Path) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = build_tokenizer(spec)
    processor = build_processor(spec, tokenizer)
    config = build_config(spec)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.save_pretrained(out_dir)
    GenerationConfig(
        eos_token_id=config.text_config.eos_token_id,
        pad_token_id=config.text_config.pad_token_id,
    ).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    _finish_tokenizer_config(out_dir / "tokenizer_config.json")
    (out_dir / MARKER_NAME).write_text(json.dumps(_marker(spec, seed), indent=2) + "\n")


def build_qwen_checkpoint(out_dir: str | Path, preset: str = "qwen-tiny", seed: int = 0) -> Path:
    """Build ``preset`` into ``out_dir`` (idempotent; staged, then renamed into place)."""
    spec = PRESETS[preset]
    out = Path(out_dir).expanduser().resolve()
    if is_complete(out, spec, seed):
        return out
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and does not hold this '{preset}' checkpoint")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write(spec, seed, staging)
        _apply_umask(staging)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trio_dev.qwen_checkpoints")
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", default="qwen-tiny", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_qwen_checkpoint(args.out, args.preset, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
