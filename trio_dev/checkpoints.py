"""Build small LLaVA-NeXT checkpoints locally, loadable by HF transformers and vLLM.

There is no model hub here (DESIGN.md section 4), so tests and benchmarks need
checkpoints that are made on the spot: a transformers config, seeded random
weights, a tokenizer trained in-process on a small embedded corpus, and the
LLaVA-NeXT processor files. The same directory must load in
``LlavaNextForConditionalGeneration.from_pretrained`` / ``AutoProcessor`` and in
``vllm.LLM(model=dir)`` without missing or unexpected weights, so that the two
implementations can be compared on identical weights.

Two presets:

* ``tiny``: about 3.5 MB in all; HF and vLLM load it in seconds. For
  unit and engine tests.
* ``bench``: the proportions of LLaVA-NeXT-7B that decide benchmark ratios
  (32 decoder layers, CLIP 336/14 tiles, the 7B grid pinpoints, so a 672x672
  image becomes 2,928 visual tokens), with narrow widths so one request takes
  seconds on a CPU.

Weights are stored in the original ``llava-hf`` layout (``language_model.model.*``,
``language_model.lm_head.*``, ``vision_tower.vision_model.*``,
``multi_modal_projector.*``, ``image_newline``), the layout of
``llava-hf/llava-v1.6-vicuna-7b-hf``. transformers 5 saves the vision tower as
``vision_tower.*`` (its ``CLIPVisionModel`` has no ``vision_model`` level any
more), which vLLM 0.32 cannot map: its ``hf_to_vllm_mapper`` only strips the
``model.`` prefix and its CLIP module expects ``vision_model.``. transformers 5
reads the legacy layout through its key-conversion mapping, so one file serves
both.

Weights are stored in float32. vLLM's ``dtype="auto"`` turns a float32
checkpoint into bfloat16 on an x86 CPU (it works, and is the faster choice for
timing); pass ``dtype="float32"`` to compare logits with HF.

CLI: ``python -m trio_dev.checkpoints --out DIR [--preset tiny|bench] [--seed N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
        PreTrainedTokenizerFast,
    )

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "IMAGE_TOKEN",
    "MARKER_NAME",
    "PRESETS",
    "CheckpointSpec",
    "build_checkpoint",
    "build_config",
    "build_processor",
    "build_tokenizer",
    "checkpoint_key",
    "is_complete_checkpoint",
    "main",
]

#: Bumped whenever the builder changes what it writes, so that directories built
#: by an older builder are not mistaken for current ones.
FORMAT_VERSION = 1

#: Written last, after every other file: its presence means the build finished.
MARKER_NAME = "trio_checkpoint.json"

WEIGHTS_NAME = "model.safetensors"

UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
IMAGE_TOKEN = "<image>"
#: Order fixes the ids: Llama's <unk>=0, <s>=1, </s>=2, then <pad>=3, <image>=4.
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN)

DEFAULT_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's "
    "questions."
)

# Vicuna v1 / LLaVA-1.6 prompt format (LLaVA's ``conv_vicuna_v1``):
#   "<s>{system} USER: <image>\n{text} ASSISTANT: {answer}</s>USER: ... ASSISTANT:"
# Content may be a string (vLLM's "string" content format, or a plain prompt)
# or an OpenAI-style list of parts. Images are rendered before text, one
# "<image>\n" each, as in llava-hf/llava-v1.6-vicuna-7b-hf. vLLM inspects the
# template's AST: because it loops over ``message['content']`` vLLM passes
# parts as {"type": "image"} / {"type": "text"} dicts ("openai" format);
# HF's processor passes {"type": "image", "url"/"image": ...}; raw OpenAI
# messages carry "image_url". All are accepted.
# The template starts with BOS, unlike llava-hf's: vLLM 0.32 renders chat with
# ``tokenizer.apply_chat_template(tokenize=True)``, which never adds special
# tokens, so without it vLLM's chat prompts would lack the BOS that HF's
# processor adds (HF's ``processor.apply_chat_template(tokenize=True)`` sees
# the leading BOS and does not add a second). A templated *string* passed on
# to a tokenizer needs ``add_special_tokens=False``.
CHAT_TEMPLATE = (
    """
{%- set image_types = ['image', 'image_url', 'image_pil', 'input_image'] -%}
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set system_message = messages[0]['content'] -%}
    {%- else -%}
        {%- set system_message = messages[0]['content']
            | selectattr('type', 'equalto', 'text')
            | map(attribute='text') | join(' ') -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set system_message = default_system_message -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{{- bos_token + system_message -}}
{%- for message in loop_messages -%}
    {%- if loop.previtem is defined and loop.previtem['role'] == 'assistant' -%}
        {%- set sep = '' -%}
    {%- else -%}
        {%- set sep = ' ' -%}
    {%- endif -%}
    {{- sep + message['role'] | upper + ': ' -}}
    {%- if message['content'] is string -%}
        {{- message['content'] -}}
    {%- elif message['content'] -%}
        {%- for part in message['content'] -%}
            {%- if part['type'] in image_types -%}{{- '<image>\\n' -}}{%- endif -%}
        {%- endfor -%}
        {{- message['content'] | selectattr('type', 'equalto', 'text')
            | map(attribute='text') | join(' ') -}}
    {%- endif -%}
    {%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- ' ASSISTANT:' -}}{%- endif -%}
""".strip()
    # Inlined rather than passed as a variable: neither vLLM nor HF supplies
    # ``default_system_message`` when rendering.
    .replace(
        "default_system_message",
        "'" + DEFAULT_SYSTEM_PROMPT.replace("'", "\\'") + "'",
    )
)

# Training text for the byte-level BPE tokenizer. It covers the vocabulary the
# generated-scene tasks use (colours, shapes, positions, counts, digits, text in
# images), the chat scaffolding and a base of common English words, so that
# prompts tokenize into word-sized pieces like a real LLaMA tokenizer would.
# Byte-level BPE keeps any other text encodable and round-trippable.
_CORPUS = """
A chat between a curious human and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the human's questions.
USER: ASSISTANT: USER: What is shown in this image? ASSISTANT: USER: Describe the
image. ASSISTANT: The image shows a red circle above a blue square.
What colour is the circle? The circle is red. What color is the square? It is blue.
How many triangles are there? There are three triangles. Is there a star? Yes.
Is the green shape on the left or on the right? It is on the left.
Which shape is at the top? The hexagon is at the top. What is written in the image?
The text says "HELLO". What letter is in the top left corner? The letter is A.
What number is written below the yellow square? The number is 42.
How many objects are there in total? There are seven objects in the picture.
Answer the question using a single word or phrase. Answer with the option's letter
from the given choices directly.
red green blue yellow orange purple pink brown black white gray grey cyan magenta
violet gold silver beige maroon navy olive teal turquoise lime indigo crimson dark
light bright pale colour colours color colors coloured colored
circle circles square squares triangle triangles rectangle rectangles star stars
diamond diamonds oval ovals hexagon hexagons pentagon pentagons heart hearts cross
crosses line lines dot dots arrow arrows ring rings shape shapes object objects
ellipse cube sphere cone cylinder polygon outline filled solid striped empty
left right top bottom middle center centre above below under over beside next
between behind front back corner corners upper lower inside outside near far
edge side sides row rows column columns grid first second third fourth fifth last
horizontal vertical diagonal position positions located location where
zero one two three four five six seven eight nine ten eleven twelve thirteen
fourteen fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty
hundred thousand count counts number numbers many much more most less least few
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 20 24 25 32 42 50 64 99 100 256 336 672
A B C D E F G H I J K L M N O P Q R S T U V W X Y Z
a b c d e f g h i j k l m n o p q r s t u v w x y z
. , ! ? : ; ' " ( ) [ ] { } - + * / = % & # @ $ < > _ ...
image images picture pictures photo photos scene scenes text texts word words
letter letters written writing label labels sign caption title read reads
yes no not true false correct wrong answer answers question questions option
options choice choices describe description explain size small smaller smallest
large larger largest big bigger biggest tiny huge tall short long wide narrow
same different similar equal bigger than total both each every all none some any
the a an of and to in is it that this there these those what which who whom whose
why how when was were be been being are am has have had having do does did done
will would shall should can could may might must for on with at by from up down
out off about into through during before after again further then once here
other such only own so too very just also well now new old good great high low
young first last long little own other same able back best better early few
important public bad young year years time times way ways day days man men woman
women child children world life hand hands part parts place places case cases
week weeks company system program work works government point points home water
room mother father area areas money story stories fact facts month months lot
study book books eye eyes job jobs business issue issues kind kinds head house
service friend friends power hour hours game games end members law car city
community name names president team minute minutes idea ideas kid kids body
information school face others level office door health person art war history
party result change morning reason research girl guy moment air teacher force
education foot boy age policy everything process music market sense nation plan
college interest death experience effect use class control care field development
role effort rate heart drug show leader light voice wife police mind price report
decision son view relationship town road arm difference value building action
model season society tax director position player record paper space ground form
event official matter center couple site project activity table need court oil
situation cost industry figure street tree film film picture rule land test
say said get got make made go went gone know knew known take took taken see saw
seen come came think thought look looked want wanted give gave given use used
find found tell told ask asked seem seemed feel felt try tried leave left call
called keep kept let begin began help helped talk turn turned start started
might show showed hear heard play played run ran move moved like liked live
lived believe hold held bring brought happen happened write wrote provide sit
stand stood lose lost pay paid meet met include included continue set learn
learned change changed lead led understand understood watch follow followed stop
stopped create created speak spoke allow allowed add added spend spent grow grew
open opened walk walked win won offer remember love consider appear buy wait
serve die send expect build stay fall cut reach kill remain suggest raise pass
sell require report decide pull point points pointing contain contains holding
looking sitting standing walking wearing playing eating drinking riding running
cat cats dog dogs bird birds horse horses cow fish animal animals person people
table chair bed window door wall floor sky cloud clouds sun moon tree trees grass
flower flowers road car cars bus train truck boat plane bicycle street building
kitchen bathroom bedroom office shop food plate cup bottle glass phone computer
screen keyboard book sign clock ball box bag hat shirt shoes water snow beach
""".strip()


@dataclass(frozen=True)
class CheckpointSpec:
    """Shape of a locally built LLaVA-NeXT checkpoint (Llama text + CLIP tower).

    Field names follow the transformers configs they end up in. ``text_init_std``
    and ``vision_init_factor`` set the random init; see ``_build_model`` for why
    the text model uses a larger spread than transformers' default 0.02.
    """

    name: str
    # Text model (Llama-style decoder).
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    vocab_size: int = 1024
    #: Text backbone: "llama" (Vicuna/Llama-2), "llama3" (Llama-3: GQA and
    #: llama3 rope scaling), "mistral" or "qwen2" (qkv bias).
    text_model_type: str = "llama"
    # CLIP vision tower.
    vision_image_size: int = 336
    vision_patch_size: int = 14
    vision_hidden_size: int = 1024
    vision_num_hidden_layers: int = 24
    vision_num_attention_heads: int = 16
    vision_intermediate_size: int = 4096
    # LLaVA-NeXT glue.
    image_grid_pinpoints: tuple[tuple[int, int], ...] = (
        (336, 672),
        (672, 336),
        (672, 672),
        (1008, 336),
        (336, 1008),
    )
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    # Storage and init.
    dtype: str = "float32"
    text_init_std: float = 0.02
    vision_init_factor: float = 1.0

    @property
    def patches_per_side(self) -> int:
        """Patches along one side of a tile (24 for CLIP 336/14)."""
        return self.vision_image_size // self.vision_patch_size

    @property
    def tokens_per_tile(self) -> int:
        """Visual tokens one tile contributes with the "default" strategy (no CLS)."""
        return self.patches_per_side**2

    def to_json_dict(self) -> dict[str, Any]:
        """Plain-JSON form (tuples become lists) used in the completion marker."""
        result: dict[str, Any] = json.loads(json.dumps(asdict(self)))
        return result


PRESETS: dict[str, CheckpointSpec] = {
    "tiny": CheckpointSpec(
        name="tiny",
        # vLLM's CPU attention supports head sizes that are multiples of 32.
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA, so code paths that split K/V heads run.
        intermediate_size=256,
        max_position_embeddings=4096,
        vision_image_size=56,
        vision_patch_size=14,  # 4x4 patches + CLS per tile.
        vision_hidden_size=32,
        vision_num_hidden_layers=2,
        vision_num_attention_heads=2,
        vision_intermediate_size=64,
        image_grid_pinpoints=((56, 112), (112, 56), (112, 112), (56, 168), (168, 56)),
        text_init_std=0.25,
    ),
    "bench": CheckpointSpec(
        name="bench",
        # LLaVA-NeXT-7B (Vicuna-7B) has 32 layers, 32 heads of 64, MLP ratio
        # 11008/4096; keep depth, head width and MLP ratio, shrink the width.
        hidden_size=512,
        num_hidden_layers=32,
        num_attention_heads=8,
        num_key_value_heads=8,
        intermediate_size=1376,
        max_position_embeddings=4096,
        # CLIP ViT-L/14-336 tiling (24x24 patches per tile), narrow and shallow.
        vision_image_size=336,
        vision_patch_size=14,
        vision_hidden_size=256,
        vision_num_hidden_layers=4,
        vision_num_attention_heads=4,
        vision_intermediate_size=1024,
        text_init_std=0.1,
    ),
}
#: The tiny preset on the other text backbones LLaVA-NeXT checkpoints use.
#: Llama-3 gets a GQA ratio of 4 (as Llama-3-8B: 32 query heads, 8 KV heads).
for _backbone, _kv_heads in (("mistral", 2), ("llama3", 1), ("qwen2", 2)):
    PRESETS[f"tiny-{_backbone}"] = replace(
        PRESETS["tiny"],
        name=f"tiny-{_backbone}",
        text_model_type=_backbone,
        num_key_value_heads=_kv_heads,
    )


# --------------------------------------------------------------------------- #
# Tokenizer and processor
# --------------------------------------------------------------------------- #


def build_tokenizer(
    spec: CheckpointSpec, extra_corpus: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``_CORPUS`` and wrap it for transformers.

    ``extra_corpus`` lines are added to the training text (several times, so
    their words become single tokens): a model trained on a closed vocabulary
    (the quality benchmark's scenes) then answers with one token per word.

    Byte-level BPE (GPT-2 style) round-trips any text exactly, and training on
    a fixed corpus with a fixed vocabulary size is deterministic, so two builds
    give identical ``tokenizer.json`` files. BOS is added by the post-processor
    (``add_bos_token=True``), as LLaMA's tokenizer does; EOS is not.
    """
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
    lines = _CORPUS.splitlines() + [line for _ in range(20) for line in extra_corpus]
    backend.train_from_iterator(lines, trainer=trainer)
    if backend.get_vocab_size() != spec.vocab_size:
        raise RuntimeError(
            f"BPE training produced {backend.get_vocab_size()} tokens, expected "
            f"{spec.vocab_size}: the embedded corpus is too small for this vocab"
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=spec.max_position_embeddings,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.convert_tokens_to_ids(token) != expected_id:
            raise RuntimeError(f"special token {token!r} did not get id {expected_id}")
    return tokenizer


def build_processor(spec: CheckpointSpec, tokenizer: PreTrainedTokenizerFast) -> LlavaNextProcessor:
    """LLaVA-NeXT processor whose tiling and token counts match the model config.

    ``num_additional_image_tokens=1`` accounts for CLIP's CLS token, which the
    "default" feature-select strategy drops; with it the processor expands
    ``<image>`` to the same count vLLM computes from the config.
    """
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    size = spec.vision_image_size
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_grid_pinpoints=[list(p) for p in spec.image_grid_pinpoints],
        do_pad=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.vision_patch_size,
        vision_feature_select_strategy=spec.vision_feature_select_strategy,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


# --------------------------------------------------------------------------- #
# Config and weights
# --------------------------------------------------------------------------- #


def build_config(spec: CheckpointSpec) -> LlavaNextConfig:
    """transformers ``LlavaNextConfig`` for ``spec`` (Llama text + CLIP vision)."""
    from transformers import CLIPVisionConfig, LlavaNextConfig

    image_token_id = SPECIAL_TOKENS.index(IMAGE_TOKEN)
    text_config = _text_config(spec)
    vision_config = CLIPVisionConfig(
        image_size=spec.vision_image_size,
        patch_size=spec.vision_patch_size,
        hidden_size=spec.vision_hidden_size,
        num_hidden_layers=spec.vision_num_hidden_layers,
        num_attention_heads=spec.vision_num_attention_heads,
        intermediate_size=spec.vision_intermediate_size,
        projection_dim=spec.hidden_size,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        initializer_factor=spec.vision_init_factor,
        dtype=spec.dtype,
    )
    config = LlavaNextConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=image_token_id,
        projector_hidden_act=spec.projector_hidden_act,
        vision_feature_select_strategy=spec.vision_feature_select_strategy,
        vision_feature_layer=spec.vision_feature_layer,
        image_grid_pinpoints=[list(p) for p in spec.image_grid_pinpoints],
        image_seq_length=spec.tokens_per_tile,
        tie_word_embeddings=False,
        dtype=spec.dtype,
    )
    # vLLM picks the model class (and generate vs. pooling runner) from this;
    # a bare config saved without it is served as a pooling model.
    config.architectures = ["LlavaNextForConditionalGeneration"]
    return config


def _text_config(spec: CheckpointSpec) -> Any:
    """The text backbone's transformers config (the shapes LLaVA-NeXT checkpoints use)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=spec.rms_norm_eps,
        hidden_act="silu",
        initializer_range=spec.text_init_std,
        tie_word_embeddings=False,
        bos_token_id=SPECIAL_TOKENS.index(BOS_TOKEN),
        eos_token_id=SPECIAL_TOKENS.index(EOS_TOKEN),
        pad_token_id=SPECIAL_TOKENS.index(PAD_TOKEN),
        dtype=spec.dtype,
    )
    default_rope = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.text_model_type == "llama":
        return LlamaConfig(rope_parameters=default_rope, **common)
    if spec.text_model_type == "llama3":
        # Llama-3.1's rope scaling, shrunk to the preset's context.
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        }
        return LlamaConfig(rope_parameters=rope, **common)
    if spec.text_model_type == "mistral":
        return MistralConfig(rope_parameters=default_rope, sliding_window=None, **common)
    if spec.text_model_type == "qwen2":
        return Qwen2Config(rope_parameters=default_rope, use_sliding_window=False, **common)
    raise ValueError(f"unknown text_model_type {spec.text_model_type!r}")


def _build_model(config: LlavaNextConfig, seed: int) -> LlavaNextForConditionalGeneration:
    """Seeded random model from transformers' own initialisers.

    transformers initialises Llama linears and embeddings with
    ``N(0, initializer_range)``. The presets raise that range above the usual
    0.02: at these widths 0.02 leaves the logits so flat (measured: logit std
    0.2-0.45, top-1/top-2 log-prob gap < 0.01) that greedy decoding cycles
    through a few tokens and HF-vs-vLLM comparisons are decided by float noise
    between near-tied logits. With 0.25 (tiny) / 0.1 (bench) the logit std is
    about 2.5 and 16 greedy tokens are (nearly) all distinct, while
    activations stay finite (RMSNorm bounds every layer's input) and the
    next-token distribution depends clearly on the image.
    """
    import torch
    from transformers import LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    return model.eval()


# transformers-internal prefix -> llava-hf/vLLM checkpoint prefix. Order matters:
# the first matching rule wins.
_KEY_RULES: tuple[tuple[str, str], ...] = (
    (r"^model\.language_model\.", "language_model.model."),
    (r"^model\.vision_tower\.(?!vision_model\.)", "vision_tower.vision_model."),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^model\.image_newline$", "image_newline"),
    (r"^lm_head\.", "language_model.lm_head."),
)


def checkpoint_key(internal_name: str) -> str:
    """Map a transformers 5 parameter name to the llava-hf checkpoint name.

    >>> checkpoint_key("model.vision_tower.encoder.layers.0.mlp.fc1.weight")
    'vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight'
    """
    for pattern, replacement in _KEY_RULES:
        new, count = re.subn(pattern, replacement, internal_name)
        if count:
            return new
    raise ValueError(f"unexpected parameter name {internal_name!r}")


def _save_weights(model: LlavaNextForConditionalGeneration, path: Path, dtype: str) -> None:
    """Write the state dict under llava-hf names to one safetensors file.

    Written directly rather than through ``save_pretrained`` so the on-disk
    names do not depend on whichever reverse key mapping a transformers
    version applies when saving (5.19 writes ``vision_tower.embeddings...``,
    which vLLM 0.32 reports as unexpected).
    """
    import torch
    from safetensors.torch import save_file

    torch_dtype: torch.dtype = getattr(torch, dtype)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = checkpoint_key(name)
        if key in tensors:
            raise RuntimeError(f"two parameters map to {key!r}")
        tensors[key] = tensor.detach().to(torch_dtype).contiguous().clone()
    save_file(tensors, str(path), metadata={"format": "pt"})


# --------------------------------------------------------------------------- #
# Build
# --------------------------------------------------------------------------- #


def _marker(spec: CheckpointSpec, seed: int) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "preset": spec.name,
        "seed": seed,
        "spec": spec.to_json_dict(),
    }


def is_complete_checkpoint(out_dir: str | Path, preset: str, seed: int) -> bool:
    """True if ``out_dir`` holds a finished build of ``preset`` with ``seed``.

    The whole spec is compared, not just the preset name, so editing a preset
    (or the builder's ``FORMAT_VERSION``) invalidates older builds.
    """
    spec = _get_spec(preset)
    marker_path = Path(out_dir) / MARKER_NAME
    try:
        found = json.loads(marker_path.read_text())
    except (OSError, ValueError):
        return False
    return found == _marker(spec, seed) and (Path(out_dir) / WEIGHTS_NAME).is_file()


def _get_spec(preset: str) -> CheckpointSpec:
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}") from None


def _write_checkpoint(spec: CheckpointSpec, seed: int, out_dir: Path) -> None:
    """Write every file of the checkpoint into the (empty) ``out_dir``."""
    from transformers import GenerationConfig

    tokenizer = build_tokenizer(spec)
    processor = build_processor(spec, tokenizer)
    config = build_config(spec)
    model = _build_model(config, seed)

    config.save_pretrained(out_dir)
    GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=config.text_config.eos_token_id,
        pad_token_id=config.text_config.pad_token_id,
    ).save_pretrained(out_dir)
    _save_weights(model, out_dir / WEIGHTS_NAME, spec.dtype)
    # The processor writes the tokenizer, image-processor and chat-template files.
    processor.save_pretrained(out_dir)
    _finish_tokenizer_config(out_dir / "tokenizer_config.json")
    (out_dir / MARKER_NAME).write_text(json.dumps(_marker(spec, seed), indent=2) + "\n")


def _finish_tokenizer_config(path: Path) -> None:
    """Name the tokenizer class portably in tokenizer_config.json.

    transformers 5 saves ``TokenizersBackend``, a name 4.x cannot resolve;
    ``PreTrainedTokenizerFast`` is the same class in 5.x and exists in 4.x.
    BOS insertion needs no flag here: it lives in tokenizer.json's
    post-processor, and 5.x ignores ``add_bos_token`` whenever tokenizer.json
    exists (so reloaded tokenizers report ``add_bos_token=False`` while still
    adding BOS; check the ids, not the flag).
    """
    data = json.loads(path.read_text())
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _apply_umask(directory: Path) -> None:
    """Give the build ordinary permissions (mkdtemp and safetensors use 0700/0600).

    Checkpoints are shared between users of one machine (e.g. a test cache
    read by a server running as another user), so use what the umask allows.
    """
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def build_checkpoint(
    out_dir: str | Path,
    preset: str = "tiny",
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Build the ``preset`` checkpoint with ``seed`` into ``out_dir``; return its path.

    Idempotent: a directory that already holds a complete build of the same
    preset and seed is returned untouched (unless ``overwrite``). The build
    goes to a temporary sibling directory that is renamed into place at the
    end, so an interrupted build never looks complete and concurrent builders
    (e.g. parallel test workers) do not see half-written files.

    Raises ``FileExistsError`` if ``out_dir`` is non-empty and holds something
    else, unless ``overwrite`` is set: we never delete files we did not write
    without being told to.
    """
    spec = _get_spec(preset)
    out = Path(out_dir).expanduser().resolve()
    if not overwrite:
        if is_complete_checkpoint(out, preset, seed):
            return out
        _refuse_foreign(out, preset, seed)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_checkpoint(spec, seed, staging)
        _apply_umask(staging)
        if not overwrite:
            if is_complete_checkpoint(out, preset, seed):
                return out  # A concurrent builder finished first; keep its copy.
            _refuse_foreign(out, preset, seed)
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        try:
            os.replace(staging, out)
        except OSError:
            # A concurrent builder renamed its copy into place between our
            # removal and our rename; accept it if it is the same build.
            if not is_complete_checkpoint(out, preset, seed):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _refuse_foreign(out: Path, preset: str, seed: int) -> None:
    """Raise unless ``out`` is absent or an empty directory."""
    if out.is_dir() and not any(out.iterdir()):
        return
    if out.exists():
        raise FileExistsError(
            f"{out} exists and does not hold a complete '{preset}' checkpoint "
            f"with seed {seed}; pass overwrite=True (--overwrite) to replace it"
        )


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints the checkpoint directory."""
    parser = argparse.ArgumentParser(
        prog="python -m trio_dev.checkpoints",
        description="Build a small random-weight LLaVA-NeXT checkpoint locally.",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if already built")
    args = parser.parse_args(argv)
    path = build_checkpoint(args.out, preset=args.preset, seed=args.seed, overwrite=args.overwrite)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
