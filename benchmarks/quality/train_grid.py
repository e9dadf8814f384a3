"""Train the quality benchmark's LLaVA-NeXT on grid scenes (seeded, resumable, CPU or CUDA).

    .venv/bin/python -m benchmarks.quality.train_grid --state /work/ckpt/grid \\
        [--out benchmarks/quality/model] [--device cuda] [--stop-at STEP]

Rerunning the same command resumes from ``--state`` (checked: a run stopped
with ``--stop-at`` and resumed wrote bit-identical weights to an uninterrupted
one). ``--stop-at`` exports an interim model without changing the schedule.

Pruning can only be judged on a model that has learned to read its image
(DESIGN.md section 4). This trains, from scratch, a LLaVA-NeXT of exactly the
architecture vLLM serves (CLIP tower, MLP projector, Llama decoder, anyres
tiles, image newlines) on ``grid_scenes`` and writes a checkpoint that HF and
vLLM 0.32 both load (``trio_dev.checkpoints`` weight layout).

Why it looks the way it does (the previous model's failure is in
``benchmarks/quality/README.md``):

* **Geometry.** 128-px tiles of 16-px patches (8x8 tokens per tile), pinpoints
  2x2, 3x2, 2x3, 3x3 tiles: 336-664 visual tokens per image (482 on average
  over the four grids). Scene cells are patches, so one token sees one whole
  object: its colour and shape are in that token, nowhere else.
* **Stages.** (0) the decoder alone on *symbolic* scenes
  (``benchmarks.quality.symbolic``): visual rows are learned embeddings of
  what each cell holds, laid out as LLaVA-NeXT packs an image; only the object
  rows are shown (background dropped, positions kept) until the last
  ``symbolic_background_steps``, in which the background rows come in. Every
  image carries ``symbolic_turns`` questions. A decoder trained from scratch on
  rendered scenes stayed at the answer prior (see ``symbolic``'s docstring).
  (1) tower + projector regressed onto those symbolic features (mean squared
  error), so the tokens the decoder will read are the ones it learned; the
  image-newline row starts as the symbolic one. (2) everything end to end,
  answer loss plus the regression as an auxiliary loss. Linear heads fitted
  on detached tokens report how readable each label is (probes only; dropped
  when saving).
* **Attention supervision** (stages 0 and 2). At every answer, two heads
  of layer ``attn_layer`` are pulled onto the tokens that hold the evidence
  (``evidence``): without it the decoder learned neither where to look nor,
  for colour and shape, what to read (``benchmarks/quality/README.md``). The
  layer is above FastV's K = 2 and TRIO's default depth 2, which therefore do
  not read the supervised map; TRIO at depth 3 runs that layer as its proxy loss.
  Optional extra heads (``relation_layer``, ``count_layer``, off in v9) give
  relation one head per side and count heads of their own.
* **Multi-turn chats.** Each image carries its split question (the eval prompt
  verbatim) and ``extra_turns`` more questions as later turns: one image
  encoding and one pass over its ~480 visual tokens supervise many answers.
* **One token per answer.** The tokenizer is trained with the scenes'
  vocabulary (``grid_scenes.vocabulary_text``), so every answer is one token
  plus ``</s>`` ("yes"/"no" were two tokens each in the old tokenizer).
* **Resumable.** ``--state DIR`` keeps the full training state (weights,
  heads, optimiser, step, history) every ``save_every`` steps; rerunning the
  same command continues from it. Data is indexed by step, so a resumed run
  sees exactly the data of an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

from trio_dev.checkpoints import (
    EOS_TOKEN,
    IMAGE_TOKEN,
    WEIGHTS_NAME,
    CheckpointSpec,
    _finish_tokenizer_config,
    _save_weights,
    build_config,
    build_processor,
    build_tokenizer,
)
from vllm_trio.core.batch import pad_rows

from .attention_rows import QueryAttention
from .evidence import QUERY_CHANNELS, evidence_tokens, question_keys
from .grid_scenes import (
    CELL,
    COLOURS,
    FAMILIES,
    LETTERS,
    RELATIONS,
    SHAPES,
    TILE,
    Sample,
    Scene,
    Turn,
    chat_prompt,
    make_conversation,
    make_split,
    normalize_answer,
    vocabulary_text,
)
from .symbolic import (
    NEWLINE,
    OBJECT,
    SymbolicEncoder,
    SymbolicFeatures,
    batch_kinds,
    ground_in_words,
    packed_layout,
    symbolic_scene,
    tile_kinds,
)
from .tower_init import neighbour_heads

if TYPE_CHECKING:
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "benchmarks" / "quality" / "model"

SPEC = CheckpointSpec(
    name="grid-scenes",
    hidden_size=128,
    num_hidden_layers=8,
    num_attention_heads=4,  # head size 32: vLLM's CPU attention needs a multiple of 32
    num_key_value_heads=4,
    intermediate_size=352,
    max_position_embeddings=2048,
    vision_image_size=TILE,
    vision_patch_size=CELL,
    vision_hidden_size=128,
    vision_num_hidden_layers=3,  # feature layer -2: the last layer is unused, as in LLaVA
    vision_num_attention_heads=4,
    vision_intermediate_size=512,
    image_grid_pinpoints=((256, 256), (256, 384), (384, 256), (384, 384)),
    dtype="float32",
    text_init_std=0.02,
)
STORE_DTYPE = "float16"


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters (all recorded in TRAINING.json). The defaults are the
    current recipe; the shipped model's own settings are in its TRAINING.json."""

    seed: int = 0
    #: Stage 0 (symbolic): the decoder alone on symbolic scenes, each image with
    #: ``symbolic_turns`` questions. Only the object rows are shown (background
    #: rows dropped, positions kept) except in the last
    #: ``symbolic_background_steps``, in which background rows come in (kept
    #: with probability 0 -> 1).
    symbolic_steps: int = 6500
    symbolic_batch: int = 8
    symbolic_lr: float = 1e-3
    symbolic_turns: int = 8
    symbolic_background_steps: int = 1000
    #: Single-family blocks inside stage 0: from step ``symbolic_blocks_start``,
    #: ``symbolic_block_steps[i]`` single-turn steps of ``FAMILIES`` index
    #: ``symbolic_block_families[i]``, one block after another, then mixed again.
    #: Mixed training learned where to look but hardly how to read a colour or a
    #: letter; a block of its own taught each (v7: colour 0.985 after 1,000
    #: steps, shape 0.985 and text 0.975 after 500). The first blocks teach
    #: (colour, shape, text, relation, presence), then two cycles of 150-step
    #: blocks of every family rehearse them, so that no family is away for
    #: more than 750 steps.
    symbolic_blocks_start: int = 1000
    symbolic_block_steps: tuple[int, ...] = (1000, 500, 500, 800, 400, *(150,) * 12)
    symbolic_block_families: tuple[int, ...] = (0, 1, 5, 3, 4, *(0, 1, 5, 3, 4, 2) * 2)
    #: Each block step also holds this many single-turn rows of all families
    #: (cycled), to rehearse the others. 0: with 8 (as many as the block's own
    #: rows) colour stayed at chance through 925 steps of its block (0.15 on
    #: the training batch; 0.87 after 500 steps without replay).
    symbolic_replay_rows: int = 0
    #: Start the colour, shape and letter rows of the symbolic features at the
    #: decoder's embeddings of those words (``symbolic.ground_in_words``).
    symbolic_word_init: bool = True
    #: Questions per chat in the mixed steps after the blocks. Evaluation asks one
    #: per image; after 3,000 single-turn block steps, 8-turn chats at first got
    #: every family wrong (v7: loss 4.88, colour 0.01, answers from the last
    #: block's yes/no vocabulary), a format shift rather than forgetting.
    symbolic_tail_turns: int = 1
    #: Weight of a loss that keeps every visual row's own labels linearly
    #: readable from the decoder's residual stream at the input of
    #: ``attn_layer`` (``Trainer.residual_heads``). Without it layers 0-2
    #: overwrote them: at the end of a 1,000-step colour block still at chance,
    #: a probe read the looked-up token's colour 100% from its embedding, 66%
    #: at layer 3's input and 30% from the supervised heads' values, although
    #: those heads put all their attention on it.
    symbolic_keep_weight: float = 1.0
    #: Weight of a loss that asks the answer position to carry what its question
    #: names (``evidence.question_keys``) at the input of ``attn_layer``, the
    #: lookup's query (``Trainer.query_heads``): without it a shape question's
    #: colour was readable there 41% of the time and shape questions stayed at
    #: 0.57 through their 500-step block.
    symbolic_query_weight: float = 1.0
    #: Every phase of stage 0 (the first mixed steps, each block, the mixed
    #: steps after the blocks) warms its learning rate up again over
    #: ``warmup`` steps: when mixing resumed after the blocks at full rate,
    #: every family fell (colour 0.01, count 0.15 on the training batch 25
    #: steps later).
    #: Attention supervision (stages 0 and 2): at every answer position, heads
    #: ``attn_heads`` of layer ``attn_layer`` are pulled onto the question's
    #: evidence tokens (``evidence``), weight ``attn_weight``. (One head per
    #: family group instead did no better in a 2,500-step trial.)
    attn_layer: int = 3
    attn_heads: tuple[int, ...] = (0, 1)
    attn_weight: float = 1.0
    #: Count answers also pull the supervised heads onto the first token (BOS),
    #: as one more target (``attention_targets``): spread evenly over n objects
    #: and BOS, the heads' output holds BOS's value with weight 1/(n+1), a
    #: signal of n. Spread over the n objects alone it is their mean, the same
    #: for every n (v8: count 0.49, mostly "one" and "four").
    count_sink: bool = True
    #: Relation answers also supervise heads ``relation_heads`` of layer
    #: ``relation_layer`` (-1: off), one head per side in ``RELATIONS`` order:
    #: the asked side's head is pulled onto the named object, the other sides'
    #: heads onto BOS. Each side's head can then read one fixed neighbour
    #: channel of the named object's token (its value projection) and the
    #: heads' summed output holds only the asked side's neighbour: choosing
    #: the side becomes which head finds the object, linear in the query,
    #: instead of a product of side and neighbours after the lookup (v9 and
    #: v10 read the neighbours from the named object's token at 0.35-0.61 but
    #: answered relation 36-40%). v11 (with the next two flags): relation on
    #: the symbolic training batch 0.92-0.98 at the end of stage 0 against
    #: v9's 0.50-0.76, but 0.47 against 0.45 on the eval images (README).
    relation_layer: int = -1
    relation_heads: tuple[int, ...] = (0, 1, 2, 3)
    #: Count answers also supervise heads ``count_heads`` of layer
    #: ``count_layer`` (-1: off) onto the counted objects and BOS, as
    #: ``attn_heads`` are (``attention_targets``). The layer-3 heads' values
    #: also carry colour and shape for the other families, which the count
    #: averages in; heads used by no other family can carry one value per
    #: object, so that their output depends on how many objects they found
    #: alone (v9: the best thresholds on the layer-3 heads' share would score
    #: 77.8% on count, the model scored 59.9%). v11: no change (count 0.58
    #: against v9's 0.61 on 600 eval questions).
    count_layer: int = -1
    count_heads: tuple[int, ...] = (0, 1)
    #: Count heads with odds (one per head, empty: off) are pulled onto BOS
    #: and the n counted objects in the shares ``count_shares`` gives (BOS
    #: o/(o+n), each object 1/(o+n)) instead of evenly: with odds 1.5, 2.5,
    #: 3.5 head h holds more than half its attention on BOS exactly when
    #: fewer than o_h objects are counted, a thermometer code of n that one
    #: threshold per head reads. Evenly, the one share 1/(n+1) must be told
    #: apart at 0.25 against 0.2 (v11: count heads of their own, spread
    #: evenly, left count at 0.58).
    count_sink_odds: tuple[float, ...] = ()
    steps: int = 500
    #: Learning rate of the decoder (language model and LM head) in stage 2, as
    #: a share of ``lr``; 0 freezes it, so that the answer loss trains only the
    #: tower, projector and image-newline row to produce what the decoder reads.
    #: On v11 the chat stage cost the decoder what stage 0 taught it (relation
    #: from symbolic rows 0.92-0.98 on the training batch at the end of stage
    #: 0, 68.9% on the eval scenes after stage 2) while the image answered
    #: relation 46.1% (``symbolic_eval``).
    chat_decoder_lr_scale: float = 1.0
    #: Weight of a stage-2 loss that pulls the decoder's hidden states on each
    #: image chat onto its hidden states on the same chat with the scene's
    #: symbolic rows in place of the image (``Trainer._rows_loss``). On v12c
    #: the final decoder answered relation 94.0% from the rows and 40.1% from
    #: the image, although the nearest symbolic class of every neighbour
    #: channel of the tower's object tokens was right 94-96% of the time.
    chat_rows_weight: float = 0.0
    #: Where ``chat_rows_weight``'s loss compares the two chats: "all" positions,
    #: or "objects", only the object tokens and the positions that predict an
    #: answer. On v13e (rows loss over all positions) the image answered
    #: relation 44%; with the one token of the answer's object replaced by its
    #: symbolic row, 89% (rows everywhere: 89%; every other object's token
    #: replaced instead: 43%): what the decoder mis-reads is a few object
    #: tokens, about 2% of the positions the plain mean weighs alike.
    chat_rows_positions: str = "all"
    batch: int = 8
    #: Single-turn chats in stage 2 too (see ``symbolic_tail_turns``).
    extra_turns: int = 0
    easy_fraction: float = 0.0
    easy_objects: int = 2
    lr: float = 1e-3
    warmup: int = 50
    decay_fraction: float = 0.3
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    aux_weight: float = 0.5
    vision_steps: int = 1000
    vision_batch: int = 8
    vision_lr: float = 2e-3
    #: Weight of the token heads' loss in the tokens' gradient (stages 1 and 2);
    #: 0 leaves the heads probes of detached tokens. With 0, after 500 vision
    #: steps a probe read a token's left neighbour 0.1% of the time although
    #: the regression target holds it: the tower never found those features.
    vision_readout_weight: float = 1.0
    #: Regress each token kind (base tile, background, object) as an equal part
    #: of the alignment loss instead of every token alike, with every image's
    #: base tile a base tile (``symbolic.batch_kinds``). About 1.3% of the
    #: tokens hold an object, so a plain mean let them be wrong: on v12c's
    #: final tower the object tokens' squared error was 0.456 of their rows'
    #: (background 0.097, base tiles 1.83; ``symbolic_eval.tower_fit``).
    align_balance: bool = False
    #: Start the tower's first layer with one head on each in-tile neighbour
    #: (``tower_init.neighbour_heads``), so that the side channels only need
    #: their content to be learned, not where to look. v11: the neighbour
    #: probes ended the vision stage at 0.91-0.92 against v9's 0.39-0.54.
    vision_neighbour_init: bool = False
    #: With ``align_balance``, object tokens with an object among their in-tile
    #: neighbours are a kind of their own in the regression. They are about 5%
    #: of the object tokens (relation scenes), the only ones whose neighbour
    #: channels the answer depends on: on v13e's tower the component of an
    #: object token along its neighbour's symbolic row was -0.17 to 0.00 of
    #: that row (own colour and shape: 0.99-1.02), while the token heads read
    #: neighbours at 0.92, nearly all of them on background tokens beside an
    #: object. Correcting that channel of the answer's object token alone
    #: raised v13e's relation answers from 44% to 77%.
    align_adjacent: bool = False
    #: The vision stage's learning rate decays linearly to ``min_lr_ratio`` of
    #: ``vision_lr`` over this last share of its steps (0: constant, as v9-v13).
    vision_decay_fraction: float = 0.0
    eval_n: int = 600
    test_n: int = 48
    save_every: int = 100
    probe_every: int = 200
    probe_n: int = 96

    def __post_init__(self) -> None:
        if self.count_sink_odds and len(self.count_sink_odds) != len(self.count_heads):
            raise ValueError(
                f"count_sink_odds needs one odds per count head {self.count_heads}, "
                f"got {self.count_sink_odds}"
            )
        if self.align_adjacent and not self.align_balance:
            raise ValueError("align_adjacent is a kind of align_balance's regression: set both")
        if self.chat_rows_positions not in ("all", "objects"):
            raise ValueError(
                f"chat_rows_positions is 'all' or 'objects', got {self.chat_rows_positions!r}"
            )
        if self.relation_layer >= 0 and len(self.relation_heads) != len(RELATIONS):
            raise ValueError(
                f"relation_heads needs one head per side {tuple(RELATIONS)}, "
                f"got {self.relation_heads}"
            )
        if len(self.symbolic_block_steps) != len(self.symbolic_block_families):
            raise ValueError(
                "symbolic_block_steps needs one length per symbolic_block_families entry, got "
                f"{self.symbolic_block_steps} for {self.symbolic_block_families}"
            )


#: Fields read only after stage 0 (the vision and chat stages, evaluation,
#: probes, saving): runs that differ in these alone have the same stage 0, so
#: one can start from another's end-of-stage-0 state (``--branch-from``)
#: instead of spending most of its training time repeating it.
AFTER_STAGE_0: frozenset[str] = frozenset(
    {
        "vision_steps",
        "vision_batch",
        "vision_lr",
        "vision_readout_weight",
        "align_balance",
        "align_adjacent",
        "vision_decay_fraction",
        "steps",
        "batch",
        "extra_turns",
        "easy_fraction",
        "easy_objects",
        "lr",
        "decay_fraction",
        "min_lr_ratio",
        "aux_weight",
        "chat_decoder_lr_scale",
        "chat_rows_weight",
        "chat_rows_positions",
        "eval_n",
        "test_n",
        "save_every",
        "probe_every",
        "probe_n",
    }
)
#: Fields read only by the chat stage (stage 2), evaluation, probes and saving:
#: runs that differ in these alone have the same stages 0 and 1.
AFTER_STAGE_1: frozenset[str] = AFTER_STAGE_0 - {
    "vision_steps",
    "vision_batch",
    "vision_lr",
    "vision_readout_weight",  # the chat stage's alignment loss reads these two too
    "align_balance",
    "align_adjacent",
    "vision_decay_fraction",
    "min_lr_ratio",  # with vision_decay_fraction
    "steps",  # with ``batch``, where the vision stage's scenes start
    "batch",
}
#: ``align_adjacent``'s regression group (beyond ``symbolic``'s four kinds).
ADJACENT_OBJECT = 4
#: The states kept at the end of stages 0 and 1, next to ``state.pt``.
STAGE_0_STATE = "stage0.pt"
STAGE_1_STATE = "stage1.pt"


# --------------------------------------------------------------------------- #
# Per-token labels
# --------------------------------------------------------------------------- #

#: (name, classes) of each label channel; class 0 is "nothing".
_DIRECTIONS: tuple[tuple[str, tuple[int, int]], ...] = tuple(
    (name.split()[0], (-dx, -dy)) for name, (dx, dy) in RELATIONS.items()
)
CHANNELS: tuple[tuple[str, int], ...] = (
    ("colour", len(COLOURS) + 1),
    ("shape", len(SHAPES) + 1),
    ("letter", len(LETTERS) + 1),
    *(
        (f"{side}-{what}", n)
        for side, _ in _DIRECTIONS
        for what, n in (("colour", len(COLOURS) + 1), ("shape", len(SHAPES) + 1))
    ),
)


def _classes(scene: Scene, cell: tuple[int, int]) -> tuple[int, int, int]:
    thing = scene.cells.get(cell)
    if thing is None:
        return 0, 0, 0
    if thing.kind == "letter":
        return 0, 0, LETTERS.index(thing.letter) + 1
    return list(COLOURS).index(thing.colour) + 1, SHAPES.index(thing.shape) + 1, 0


def token_labels(scene: Scene) -> torch.Tensor:
    """Labels of every visual token of ``scene``'s tiles: (tiles, patches, channels), long.

    Tile 0 is the base image (the whole scene squeezed into one tile): -100
    (not supervised). High-resolution tile ``k`` is tile ``k - 1`` of the grid
    in row-major order, its patch ``p`` the cell ``(8 tx + p % 8, 8 ty + p // 8)``.
    Neighbour channels of a cell whose neighbour lies in another tile are -100:
    a tile is encoded alone, so its tokens cannot see across its border.
    Built on the whole cell grid at once (per-cell Python was a quarter of a
    symbolic step).
    """
    side = TILE // CELL
    tiles_x, tiles_y = scene.width // TILE, scene.height // TILE
    rows, cols = scene.rows, scene.cols
    own = torch.zeros(rows, cols, 3, dtype=torch.long)
    for c, r in scene.cells:
        own[r, c] = torch.tensor(_classes(scene, (c, r)))
    r_at = torch.arange(rows).view(-1, 1).expand(rows, cols)
    c_at = torch.arange(cols).view(1, -1).expand(rows, cols)
    channels = [own]
    for _, (dx, dy) in _DIRECTIONS:
        nr, nc = r_at + dy, c_at + dx
        # Floor division: a neighbour off the grid (-1 or cols) is in no tile.
        same_tile = (nc.div(side, rounding_mode="floor") == c_at // side) & (
            nr.div(side, rounding_mode="floor") == r_at // side
        )
        neighbour = own[nr.clamp(0, rows - 1), nc.clamp(0, cols - 1), :2]
        channels.append(torch.where(same_tile.unsqueeze(-1), neighbour, -100))
    grid = torch.cat(channels, dim=-1)  # (rows, cols, channels)
    tiles = grid.view(tiles_y, side, tiles_x, side, -1).permute(0, 2, 1, 3, 4)
    tiles = tiles.reshape(tiles_y * tiles_x, side * side, grid.shape[-1])
    return torch.cat([torch.full((1, side * side, grid.shape[-1]), -100), tiles])


class TokenHeads(torch.nn.Module):
    """Training-only linear read-outs (never saved): of every visual token's
    ``CHANNELS`` by default, or of other labelled ``channels``."""

    def __init__(self, hidden: int, channels: Sequence[tuple[str, int]] = CHANNELS) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, n) for _, n in channels)

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """Balanced cross-entropy (mean over "nothing" plus mean over the rest) per channel,
        and per channel the accuracy on labelled non-empty tokens."""
        flat = tokens.reshape(-1, tokens.shape[-1])
        labels = labels.reshape(-1, labels.shape[-1]).to(tokens.device)
        total = flat.new_zeros(())
        accuracy = []
        for c, head in enumerate(self.heads):
            target = labels[:, c]
            known = target >= 0
            logits = head(flat[known]).float()
            target = target[known]
            obj = target > 0
            total = total + F.cross_entropy(logits[~obj], target[~obj])
            if obj.any():
                total = total + F.cross_entropy(logits[obj], target[obj])
                accuracy.append((logits[obj].argmax(-1) == target[obj]).float().mean().item())
            else:
                accuracy.append(float("nan"))
        return total / len(self.heads), accuracy

    def plain_loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Cross-entropy over every labelled row and channel, and channel 0's
        accuracy on rows where it is not class 0 (NaN where there are none)."""
        total = tokens.new_zeros(())
        for c, head in enumerate(self.heads):
            known = labels[:, c] >= 0
            logits = head(tokens[known]).float()
            total = total + F.cross_entropy(logits, labels[known, c])
            if c == 0:
                coloured = labels[known, 0] > 0
                hits = logits[coloured].argmax(-1) == labels[known, 0][coloured]
                colour = hits.float().mean().item() if coloured.any() else float("nan")
        return total / len(self.heads), colour


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #


@dataclass
class Batch:
    """One right-padded batch (labels -100 outside answers)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor
    image_sizes: torch.Tensor
    token_labels: torch.Tensor
    #: (row, position, family) of every answer's token.
    answers: list[tuple[int, int, str]]
    #: (row, position predicting the answer, evidence token positions, turn).
    looks: list[tuple[int, int, list[int], Turn]]
    #: Each row's scene (its symbolic rows for ``chat_rows_weight``).
    scenes: list[Scene]

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.pixel_values.to(device),
            self.image_sizes.to(device),
            self.token_labels,
            self.answers,
            self.looks,
            self.scenes,
        )


def build_scene_processor() -> LlavaNextProcessor:
    """The processor (tokenizer with the scenes' vocabulary) saved with the checkpoint."""
    return build_processor(SPEC, build_tokenizer(SPEC, vocabulary_text()))


def encode_conversation(
    processor: LlavaNextProcessor, sample: Sample, extra: Sequence[Turn]
) -> tuple[list[int], list[int], torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
    """Token ids, labels, pixel values, image size and answer positions of one chat.

    The first turn is ``chat_prompt(question)`` as at evaluation time; later
    turns follow the chat template (``" {answer}</s>"``, then
    ``"USER: {question} ASSISTANT:"``), tokenized piecewise at pre-tokenizer
    boundaries (``check_tokenization`` verifies the ids equal the whole string's).
    """
    tokenizer = processor.tokenizer
    enc = processor(images=sample.image, text=chat_prompt(sample.question), return_tensors="pt")
    ids: list[int] = enc["input_ids"][0].tolist()
    labels = [-100] * len(ids)
    starts: list[tuple[int, str]] = []
    for i, turn in enumerate(conversation_turns(sample, extra)):
        if i > 0:
            prompt = tokenizer(f"USER: {turn.question} ASSISTANT:", add_special_tokens=False)
            ids += prompt["input_ids"]
            labels += [-100] * len(prompt["input_ids"])
        answer = tokenizer(f" {turn.answer}{EOS_TOKEN}", add_special_tokens=False)["input_ids"]
        starts.append((len(ids), turn.family))
        ids += answer
        labels += answer
    return ids, labels, enc["pixel_values"][0], enc["image_sizes"][0], starts


def conversation_turns(sample: Sample, extra: Sequence[Turn]) -> list[Turn]:
    """The chat's turns: the split question first, then ``extra``."""
    return [Turn(sample.question, sample.answer, sample.family), *extra]


def conversation_text(sample: Sample, extra: Sequence[Turn]) -> str:
    """The whole chat as one string (what ``encode_conversation`` tokenizes piecewise)."""
    text = f"{chat_prompt(sample.question)} {sample.answer}{EOS_TOKEN}"
    for turn in extra:
        text += f"USER: {turn.question} ASSISTANT: {turn.answer}{EOS_TOKEN}"
    return text


def check_tokenization(processor: LlavaNextProcessor, seed: int) -> None:
    """Piecewise tokenization equals the whole chat's; ``chat_prompt`` equals the template's."""
    sample, extra = make_conversation("train", 0, seed, 3)
    ids = encode_conversation(processor, sample, extra)[0]
    whole = processor(images=sample.image, text=conversation_text(sample, extra))["input_ids"][0]
    if list(whole) != ids:
        raise RuntimeError("piecewise tokenization differs from whole-string tokenization")
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]}
    ]
    tokenizer = processor.tokenizer
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if rendered != tokenizer.bos_token + chat_prompt(sample.question):
        raise RuntimeError(f"chat_prompt differs from the chat template: {rendered!r}")
    for word in vocabulary_answers():
        if len(tokenizer(f" {word}", add_special_tokens=False)["input_ids"]) != 1:
            raise RuntimeError(f"answer {word!r} is not one token")


def vocabulary_answers() -> list[str]:
    """Every answer word of every family."""
    from .grid_scenes import COUNT_WORDS

    return [*COLOURS, *SHAPES, *LETTERS, *COUNT_WORDS[1:], "yes", "no"]


def make_batch(processor: LlavaNextProcessor, step: int, cfg: TrainConfig) -> Batch:
    """Batch ``step``: train conversations ``step*B .. step*B+B-1``."""
    easy = step < cfg.easy_fraction * cfg.steps
    rows, token_rows, scenes, turns = [], [], [], []
    for index in range(step * cfg.batch, (step + 1) * cfg.batch):
        sample, extra = make_conversation(
            "train", index, cfg.seed, cfg.extra_turns, cfg.easy_objects if easy else None
        )
        rows.append(encode_conversation(processor, sample, extra))
        scenes.append(sample.scene)
        turns.append(conversation_turns(sample, extra))
        token_rows.append(token_labels(sample.scene))
    length = max(len(r[0]) for r in rows)
    tiles = max(r[2].shape[0] for r in rows)
    input_ids = torch.full((len(rows), length), processor.tokenizer.pad_token_id)
    labels = torch.full((len(rows), length), -100)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    pixels = torch.zeros((len(rows), tiles, *rows[0][2].shape[1:]))
    answers, looks = [], []
    image_token = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for i, (ids, lab, pix, _, starts) in enumerate(rows):
        answers += [(i, pos, family) for pos, family in starts]
        first = ids.index(image_token)
        for (pos, _), turn in zip(starts, turns[i], strict=True):
            where = [first + t for t in evidence_tokens(scenes[i], turn)]
            looks.append((i, pos - 1, where, turn))
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
        pixels[i, : pix.shape[0]] = pix
    sizes = torch.stack([r[3] for r in rows])
    token_labels_ = torch.cat(token_rows)
    return Batch(input_ids, mask, labels, pixels, sizes, token_labels_, answers, looks, scenes)


# --------------------------------------------------------------------------- #
# Model and losses
# --------------------------------------------------------------------------- #


def build_model(seed: int) -> LlavaNextForConditionalGeneration:
    """Seeded fresh model with transformers' initialisers."""
    from transformers import LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    return LlavaNextForConditionalGeneration(build_config(SPEC))


def chat_losses(
    model: LlavaNextForConditionalGeneration,
    batch: Batch,
    token_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, dict[str, tuple[int, int]], tuple[torch.Tensor, ...]]:
    """Answer cross-entropy, ``token_loss(projected tokens, token labels)``, per
    family (answers right, answers), and the decoder's hidden states."""
    captured: list[torch.Tensor] = []
    hook = model.model.multi_modal_projector.register_forward_hook(
        lambda _m, _i, output: captured.append(output)
    )
    try:
        out = model.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=batch.pixel_values,
            image_sizes=batch.image_sizes,
            use_cache=False,
            output_hidden_states=True,
        )
    finally:
        hook.remove()
    hidden = out.last_hidden_state[:, :-1]
    targets = batch.labels[:, 1:]
    keep = targets != -100
    loss = F.cross_entropy(model.lm_head(hidden[keep]).float(), targets[keep])
    visual = token_loss(captured[0], batch.token_labels)
    with torch.no_grad():
        rows = torch.tensor([r for r, _, _ in batch.answers])
        pos = torch.tensor([p for _, p, _ in batch.answers])
        first = model.lm_head(out.last_hidden_state[rows, pos - 1]).argmax(-1)
        hits = (first == batch.input_ids[rows, pos]).tolist()
    counts: dict[str, tuple[int, int]] = {}
    for (_, _, family), hit in zip(batch.answers, hits, strict=True):
        c, t = counts.get(family, (0, 0))
        counts[family] = (c + int(hit), t + 1)
    return loss, visual, counts, out.hidden_states


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Warm-up, constant, then linear decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    decay_start = cfg.steps * (1 - cfg.decay_fraction)
    if step < decay_start:
        return cfg.lr
    progress = (step - decay_start) / max(1.0, cfg.steps - decay_start)
    return cfg.lr * (1 - (1 - cfg.min_lr_ratio) * progress)


def vision_lr_at(step: int, cfg: TrainConfig) -> float:
    """The vision stage's: warm-up, constant, then over the last
    ``vision_decay_fraction`` of its steps linear decay to ``min_lr_ratio``."""
    warm = cfg.vision_lr * min(1.0, (step + 1) / cfg.warmup)
    decay_start = cfg.vision_steps * (1 - cfg.vision_decay_fraction)
    if not cfg.vision_decay_fraction or step < decay_start:
        return warm
    progress = (step - decay_start) / max(1.0, cfg.vision_steps - decay_start)
    return warm * (1 - (1 - cfg.min_lr_ratio) * progress)


def make_optimizer(
    params: list[tuple[str, torch.nn.Parameter]],
    cfg: TrainConfig,
    lr_scale: Callable[[str], float] = lambda _name: 1.0,
):
    """AdamW with weight decay on matrices other than embeddings; a parameter's
    learning rate is ``lr_scale(name)`` times the step's (``_step``), and one
    with scale 0 is left out (frozen)."""
    groups = []
    for scale in sorted({lr_scale(n) for n, _ in params} - {0.0}, reverse=True):
        mine = [(n, p) for n, p in params if lr_scale(n) == scale]
        decay = [p for n, p in mine if p.ndim >= 2 and "embed" not in n]
        no_decay = [p for n, p in mine if p.ndim < 2 or "embed" in n]
        groups += [
            {"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": scale},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": scale},
        ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))


def _step(optimizer: torch.optim.Optimizer, lr: float, loss: torch.Tensor, clip: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()


# --------------------------------------------------------------------------- #
# Evaluation (HF, greedy)
# --------------------------------------------------------------------------- #


def greedy_answer(
    model: LlavaNextForConditionalGeneration, processor: LlavaNextProcessor, sample: Sample
) -> str:
    """HF greedy decoding (3 new tokens) of one sample's single-turn prompt."""
    enc = processor(images=sample.image, text=chat_prompt(sample.question), return_tensors="pt")
    enc = {k: v.to(model.device) for k, v in enc.items()}
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=3, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id
        )
    return processor.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def evaluate(
    model: LlavaNextForConditionalGeneration,
    processor: LlavaNextProcessor,
    samples: Sequence[Sample],
) -> dict[str, Any]:
    """``{"n", "accuracy", "per_family", "answers"}`` of HF greedy answers."""
    was_training = model.training
    model.eval()
    correct = dict.fromkeys(FAMILIES, 0)
    total = dict.fromkeys(FAMILIES, 0)
    answers = []
    for sample in samples:
        prediction = normalize_answer(greedy_answer(model, processor, sample))
        answers.append(prediction)
        total[sample.family] += 1
        correct[sample.family] += int(prediction == sample.answer)
    model.train(was_training)
    n = sum(total.values())
    return {
        "n": n,
        "accuracy": round(sum(correct.values()) / max(1, n), 4),
        "per_family": {f: round(correct[f] / total[f], 4) for f in FAMILIES if total[f]},
        "answers": answers,
    }


# --------------------------------------------------------------------------- #
# Saving and loading
# --------------------------------------------------------------------------- #


def save_checkpoint(
    model: LlavaNextForConditionalGeneration, processor: LlavaNextProcessor, out_dir: Path
) -> None:
    """Write a complete LLaVA-NeXT directory (llava-hf layout) atomically into ``out_dir``."""
    from transformers import GenerationConfig

    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        config = build_config(SPEC)
        config.save_pretrained(staging)
        GenerationConfig(
            bos_token_id=config.text_config.bos_token_id,
            eos_token_id=config.text_config.eos_token_id,
            pad_token_id=config.text_config.pad_token_id,
        ).save_pretrained(staging)
        _save_weights(model, staging / WEIGHTS_NAME, STORE_DTYPE)
        processor.save_pretrained(staging)
        _finish_tokenizer_config(staging / "tokenizer_config.json")
        staging.chmod(0o755)
        for path in staging.iterdir():
            path.chmod(0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_checkpoint(
    model_dir: Path,
) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """Load a saved checkpoint in float32 (HF), failing on missing or unexpected keys."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model, info = LlavaNextForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise RuntimeError(f"checkpoint {model_dir} did not load cleanly: {info}")
    return model.eval(), AutoProcessor.from_pretrained(model_dir)


# --------------------------------------------------------------------------- #
# Driver
# --------------------------------------------------------------------------- #


class Trainer:
    """All three stages, with the whole state saved to and resumed from ``state_dir``."""

    def __init__(
        self,
        cfg: TrainConfig,
        state_dir: Path,
        device: torch.device,
        branch_from: Path | None = None,
    ) -> None:
        self.cfg, self.device = cfg, device
        self.state_path = state_dir / "state.pt"
        self.start = time.monotonic()
        self.processor = build_scene_processor()
        check_tokenization(self.processor, cfg.seed)
        self.model = build_model(cfg.seed).to(device).train()
        if cfg.vision_neighbour_init:
            neighbour_heads(self.model.model.vision_tower, [d for _, d in _DIRECTIONS])
        torch.manual_seed(cfg.seed + 1)
        self.heads = TokenHeads(SPEC.hidden_size).to(device)
        self.residual_heads = TokenHeads(SPEC.hidden_size).to(device)
        self.query_heads = TokenHeads(SPEC.hidden_size, QUERY_CHANNELS).to(device)
        self.symbolic = SymbolicFeatures(SPEC.hidden_size, [n for _, n in CHANNELS]).to(device)
        if cfg.symbolic_word_init:
            ground_in_words(
                self.symbolic,
                self.model.model.language_model.embed_tokens.weight,
                channel_words(self.processor.tokenizer),
            )
        self.encoder = SymbolicEncoder(
            self.processor.tokenizer, self.model.config.image_token_index
        )
        layers = self.model.model.language_model.layers
        self.attention_rows = QueryAttention(layers[cfg.attn_layer])
        self.relation_rows = (
            QueryAttention(layers[cfg.relation_layer]) if cfg.relation_layer >= 0 else None
        )
        self.count_rows = QueryAttention(layers[cfg.count_layer]) if cfg.count_layer >= 0 else None
        decoder = [
            *self.model.model.language_model.named_parameters(),
            *self.model.lm_head.named_parameters(),
            *self.symbolic.named_parameters(),
            *self.residual_heads.named_parameters(),
            *self.query_heads.named_parameters(),
        ]
        self.symbolic_optimizer = make_optimizer(decoder, replace(cfg, lr=cfg.symbolic_lr))
        vision = [
            *self.model.model.vision_tower.named_parameters(),
            *self.model.model.multi_modal_projector.named_parameters(),
            *self.heads.named_parameters(),
        ]
        self.vision_optimizer = make_optimizer(vision, cfg)
        self.optimizer = make_optimizer(
            [*self.model.named_parameters(), *self.heads.named_parameters()],
            cfg,
            lambda name: cfg.chat_decoder_lr_scale if _in_decoder(name) else 1.0,
        )
        self.step = 0  # over all stages: symbolic, vision, chat
        self.history: list[dict[str, Any]] = []
        self.seconds = 0.0  # training wall time over all resumed runs
        if self.state_path.exists():
            self._load()
        elif branch_from is not None:
            self._branch(branch_from)

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.start:7.1f}s] {message}", flush=True)

    def _modules(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "heads": self.heads,
            "residual_heads": self.residual_heads,
            "query_heads": self.query_heads,
            "symbolic": self.symbolic,
            "symbolic_optimizer": self.symbolic_optimizer,
            "vision_optimizer": self.vision_optimizer,
            "optimizer": self.optimizer,
        }

    def _load(self) -> None:
        state = torch.load(self.state_path, map_location=self.device, weights_only=False)
        # A field added after the state was saved takes its default, which is
        # the behaviour the state was trained with (new flags default to off).
        if TrainConfig(**state["config"]) != self.cfg:
            raise SystemExit(
                f"{self.state_path} belongs to another configuration: {state['config']}"
            )
        for name, module in self._modules().items():
            module.load_state_dict(state[name])
        self.step, self.history, self.seconds = state["step"], state["history"], state["seconds"]
        self.say(f"resumed from {self.state_path} at step {self.step}")

    def _branch(self, path: Path) -> None:
        """Start from another run's state at the end of stage 0 (``STAGE_0_STATE``)
        or stage 1 (``STAGE_1_STATE``), whose configuration may differ from this
        one only in ``AFTER_STAGE_0`` or ``AFTER_STAGE_1``: what the two runs did
        up to there is the same. The optimisers of the stages still to come
        start fresh, as they would (none of them has stepped yet)."""
        state = torch.load(path, map_location=self.device, weights_only=False)
        ends = {
            self.cfg.symbolic_steps: (AFTER_STAGE_0, ("vision_optimizer", "optimizer"), "0"),
            self.cfg.symbolic_steps + self.cfg.vision_steps: (AFTER_STAGE_1, ("optimizer",), "1"),
        }
        if state["step"] not in ends:
            raise SystemExit(
                f"{path} was saved at step {state['step']}, not at the end of stage 0 or 1 "
                f"(steps {', '.join(map(str, ends))})"
            )
        free, later, stage = ends[state["step"]]
        saved = TrainConfig(**state["config"])
        differ = [
            f.name
            for f in fields(TrainConfig)
            if f.name not in free and getattr(saved, f.name) != getattr(self.cfg, f.name)
        ]
        if differ:
            raise SystemExit(f"{path} had another stage {stage}: it differs in {', '.join(differ)}")
        for name, module in self._modules().items():
            if name not in later:
                module.load_state_dict(state[name])
        self.step, self.history, self.seconds = state["step"], state["history"], state["seconds"]
        self.say(f"branched from {path} at step {self.step}")

    def _save(self, seconds: float) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        state = {name: module.state_dict() for name, module in self._modules().items()}
        state |= {"config": asdict(self.cfg), "step": self.step, "history": self.history}
        torch.save(state | {"seconds": seconds}, tmp)
        os.replace(tmp, self.state_path)

    def run(self, stop_at: int | None = None) -> float:
        """Train to the end, or to step ``stop_at`` of all stages, from wherever the
        state is; returns the training seconds of all runs so far."""
        cfg = self.cfg
        chat_start = cfg.symbolic_steps + cfg.vision_steps
        total = chat_start + cfg.steps
        end = total if stop_at is None else min(total, stop_at)
        run_start = time.monotonic()
        base_seconds = self.seconds
        stats: dict[str, list[float]] = {}
        while self.step < end:
            if self.step < cfg.symbolic_steps:
                record = self._symbolic_step(self.step)
            elif self.step < chat_start:
                record = self._vision_step(self.step - cfg.symbolic_steps)
            else:
                record = self._chat_step(self.step - chat_start)
            for key, value in record.items():
                stats.setdefault(key, []).append(value)
            self.step += 1
            if self.step % 25 == 0 or self.step == total:
                mean = {k: round(sum(v) / len(v), 4) for k, v in stats.items()}
                stats.clear()
                self.history.append({"step": self.step, **mean})
                self.say(f"step {self.step:5d} " + " ".join(f"{k} {v}" for k, v in mean.items()))
            seconds = base_seconds + time.monotonic() - run_start
            probe = cfg.probe_every and self.step % cfg.probe_every == 0
            if probe and self.step > chat_start:
                self._probe()
            kept = {cfg.symbolic_steps: STAGE_0_STATE, chat_start: STAGE_1_STATE}
            if self.step % cfg.save_every == 0 or self.step in (end, *kept):
                self._save(seconds)
            if self.step in kept:
                shutil.copyfile(self.state_path, self.state_path.with_name(kept[self.step]))
        return base_seconds + time.monotonic() - run_start

    def _symbolic_step(self, step: int) -> dict[str, float]:
        """Stage 0: the decoder on symbolic scenes (``benchmarks.quality.symbolic``)."""
        cfg = self.cfg
        keep_background = symbolic_background(step, cfg)
        family = symbolic_family(step, cfg)
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        lm = self.model.model.language_model
        embeds, targets, positions, looks, keys = [], [], [], [], []
        rows, cols, row_labels = [], [], []
        for row, (scene, turns) in enumerate(symbolic_chats(step, family, cfg)):
            kinds, labels = packed_layout(scene, token_labels(scene))
            ids, answer_labels, first, starts = self.encoder.encode(turns, kinds.numel())
            keep = torch.ones(len(ids), dtype=torch.bool)
            drop = (kinds != OBJECT) & (
                torch.rand(kinds.numel(), generator=generator) >= keep_background
            )
            keep[first : first + kinds.numel()] = ~drop
            kept_at = torch.cumsum(keep, 0) - 1  # index in the kept sequence
            shown = (~drop).nonzero().squeeze(1)
            rows += [row] * shown.numel()
            cols.append(kept_at[first + shown])
            row_labels.append(labels[shown])
            for start, turn in zip(starts, turns, strict=True):
                where = [int(kept_at[first + t]) for t in evidence_tokens(scene, turn)]
                looks.append((row, int(kept_at[start - 1]), where, turn))
                keys.append(question_keys(turn))
            e = self.symbolic_embeddings(ids, first, kinds, labels)
            embeds.append(e[keep.to(self.device)])
            targets.append(torch.tensor(answer_labels)[keep].to(self.device))
            # Kept rows keep their positions in the whole prompt (the grid's geometry).
            positions.append(keep.nonzero().squeeze(1).to(self.device))
        mask = pad_rows([torch.ones_like(p) for p in positions])
        embeds, targets, positions = pad_rows(embeds), pad_rows(targets, -100), pad_rows(positions)
        out = lm(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            use_cache=False,
            output_hidden_states=True,
        )
        logits = self.model.lm_head(out.last_hidden_state[:, :-1]).float()
        shifted = targets[:, 1:]
        supervised = shifted != -100
        loss = F.cross_entropy(logits[supervised], shifted[supervised])
        attention = self._attention_loss(looks)
        hidden = out.hidden_states[cfg.attn_layer]  # the supervised layer's input
        visual = hidden[torch.tensor(rows), torch.cat(cols)]
        kept, colour = self.residual_heads.plain_loss(visual, torch.cat(row_labels).to(self.device))
        query = hidden[
            torch.tensor([r for r, *_ in looks]), torch.tensor([q for _, q, *_ in looks])
        ]
        asked, asked_colour = self.query_heads.plain_loss(
            query, torch.tensor(keys, device=self.device)
        )
        total = (
            loss
            + cfg.attn_weight * attention
            + cfg.symbolic_keep_weight * kept
            + cfg.symbolic_query_weight * asked
        )
        lr = cfg.symbolic_lr * min(1.0, (step - symbolic_phase_start(step, cfg) + 1) / cfg.warmup)
        _step(self.symbolic_optimizer, lr, total, cfg.grad_clip)
        record = {
            "symbolic_loss": loss.item(),
            "attn_loss": attention.item(),
            "keep_loss": kept.item(),
            "keep_colour": colour,
            "query_loss": asked.item(),
            "query_colour": asked_colour,
        }
        with torch.no_grad():
            predicted = logits.argmax(-1)
            counts: dict[str, list[int]] = {}
            for row, query, _, turn in looks:
                hit = int(predicted[row, query] == shifted[row, query])
                counts.setdefault(turn.family, []).append(hit)
        hits = [h for v in counts.values() for h in v]
        record["answer_acc"] = sum(hits) / len(hits)
        return record | {f"acc_{f[:4]}": sum(v) / len(v) for f, v in counts.items()}

    def symbolic_embeddings(
        self, ids: Sequence[int], first: int, kinds: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Input embeddings ``[len(ids), hidden]`` of a symbolic chat: the decoder's
        word embeddings, with the image's placeholders from ``first`` on replaced
        by the symbolic rows of ``kinds`` and ``labels`` (``packed_layout``)."""
        e = self.model.model.language_model.embed_tokens(torch.tensor(ids, device=self.device))
        visual = self.symbolic(kinds.to(self.device), labels.to(self.device))
        return torch.cat([e[:first], visual, e[first + kinds.numel() :]])

    def _attention_loss(self, looks: Sequence[tuple[int, int, list[int], Turn]]) -> torch.Tensor:
        """Mean over answers of ``-log`` attention of the supervised heads (at the
        position that predicts the answer) on each evidence token, plus the
        relation and count heads' terms (``_relation_loss``, ``_count_loss``);
        ``looks`` holds (batch row, query position, evidence positions, turn)."""
        looks = [look for look in looks if look[2]]  # a "no" with nothing alike: no target
        main = self._head_loss(
            self.attention_rows,
            self.cfg.attn_heads,
            looks,
            lambda where, turn: [attention_targets(where, turn.family, self.cfg.count_sink)]
            * len(self.cfg.attn_heads),
        )
        return main + self._relation_loss(looks) + self._count_loss(looks)

    def _count_loss(self, looks: Sequence[tuple[int, int, list[int], Turn]]) -> torch.Tensor:
        """``count_heads`` on the counted objects and BOS, evenly or in the shares
        of ``count_sink_odds`` (``_head_loss``)."""
        odds = self.cfg.count_sink_odds
        return self._head_loss(
            self.count_rows,
            self.cfg.count_heads,
            [look for look in looks if look[3].family == "count"],
            lambda where, _turn: [attention_targets(where, "count", True)]
            * len(self.cfg.count_heads),
            (lambda where, _turn: [count_shares(len(where), o) for o in odds]) if odds else None,
        )

    def _relation_loss(self, looks: Sequence[tuple[int, int, list[int], Turn]]) -> torch.Tensor:
        """``relation_heads`` on the named object (the asked side's head) or BOS
        (the other sides' heads; ``relation_targets``, ``_head_loss``)."""
        return self._head_loss(
            self.relation_rows,
            self.cfg.relation_heads,
            [look for look in looks if look[3].family == "relation"],
            relation_targets,
        )

    def _head_loss(
        self,
        rows: QueryAttention | None,
        heads: Sequence[int],
        looks: Sequence[tuple[int, int, list[int], Turn]],
        targets: Callable[[list[int], Turn], list[list[int]]],
        shares: Callable[[list[int], Turn], list[list[float]]] | None = None,
    ) -> torch.Tensor:
        """Mean over ``looks`` and ``heads`` of the cross-entropy of each head's
        attention (of the layer ``rows`` watches) against its ``targets(evidence,
        turn)`` positions, in ``shares`` (default: evenly, the mean ``-log``);
        zero where that supervision is off (``rows`` None) or nothing asks for it."""
        if rows is None or not looks:
            return torch.zeros((), device=self.device)
        weights = rows.weights([r for r, _, _, _ in looks], [q for _, q, _, _ in looks], heads)
        terms = []
        for w, (_, _, where, turn) in zip(weights, looks, strict=True):
            logs = [w[h, t].clamp_min(1e-9).log() for h, t in enumerate(targets(where, turn))]
            if shares is None:
                terms += [-log.mean() for log in logs]
            else:
                pairs = zip(logs, shares(where, turn), strict=True)
                terms += [-(log * log.new_tensor(p)).sum() for log, p in pairs]
        return torch.stack(terms).mean()

    def _align_loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Projected tokens regressed onto their (frozen) symbolic features (every
        token alike, or each kind an equal part with ``align_balance``), plus the
        linear token heads' loss, whose gradient reaches the tokens scaled by
        ``vision_readout_weight`` (0: the heads only probe readability)."""
        labels = labels.to(tokens.device)
        # ``tile_kinds`` marks a batch's first tile alone as a base tile, so
        # without ``align_balance`` (v9-v12) the other images' base tiles were
        # regressed onto the background row; ``batch_kinds`` marks every one.
        kinds = batch_kinds(labels) if self.cfg.align_balance else tile_kinds(labels)
        with torch.no_grad():
            target = self.symbolic(kinds, labels)
        readout = scaled_gradient(tokens, self.cfg.vision_readout_weight)
        if self.cfg.align_balance:
            error = (tokens.float() - target.float()).pow(2).sum(-1)
            groups = kinds.clone()
            if self.cfg.align_adjacent:
                groups[(kinds == OBJECT) & (labels[..., 3:] > 0).any(-1)] = ADJACENT_OBJECT
            regression = torch.stack([error[groups == k].mean() for k in groups.unique()]).mean()
        else:
            regression = F.mse_loss(tokens.float(), target.float()) * SPEC.hidden_size
        return regression + self.heads.loss(readout, labels)[0]

    def _vision_step(self, step: int) -> dict[str, float]:
        """Stage 1: tower + projector regressed onto the symbolic features."""
        cfg = self.cfg
        if step == 0:  # the newline row the decoder learned in stage 0
            with torch.no_grad():
                self.model.model.image_newline.copy_(self.symbolic.kinds.weight[NEWLINE])
        pixels, labels = [], []
        first = (cfg.steps + 1) * cfg.batch + step * cfg.vision_batch  # after every chat
        for index in range(first, first + cfg.vision_batch):
            sample, _ = make_conversation("train", index, cfg.seed, 0)
            enc = self.processor.image_processor(images=sample.image, return_tensors="pt")
            pixels.append(enc["pixel_values"][0])
            labels.append(token_labels(sample.scene))
        model = self.model.model
        hidden = model.vision_tower(
            torch.cat(pixels).to(self.device), output_hidden_states=True
        ).hidden_states[SPEC.vision_feature_layer][:, 1:]
        tokens, all_labels = model.multi_modal_projector(hidden), torch.cat(labels)
        loss = self._align_loss(tokens, all_labels)
        _step(self.vision_optimizer, vision_lr_at(step, cfg), loss, cfg.grad_clip)
        accuracy = self.heads.loss(tokens.detach(), all_labels)[1]
        names = [n for n, _ in CHANNELS]
        out = {"align_loss": loss.item()}
        for name in ("colour", "shape", "letter", "left-colour", "left-shape"):
            value = accuracy[names.index(name)]
            if value == value:  # not NaN
                out[f"acc_{name}"] = value
        return out

    def _chat_step(self, step: int) -> dict[str, float]:
        """Stage 2: everything end to end, answer loss plus the alignment loss."""
        cfg = self.cfg
        if cfg.chat_decoder_lr_scale == 0:  # frozen: no weight gradients, none in the clip
            for name, param in self.model.named_parameters():
                if _in_decoder(name):
                    param.requires_grad_(False)
        batch = make_batch(self.processor, step, cfg).to(self.device)
        loss, visual, counts, hidden = chat_losses(self.model, batch, self._align_loss)
        attention = self._attention_loss(batch.looks)  # rows of the forward just run
        total = loss + cfg.aux_weight * visual + cfg.attn_weight * attention
        out = {"loss": loss.item(), "visual": visual.item(), "attn_loss": attention.item()}
        if cfg.chat_rows_weight:
            rows = self._rows_loss(batch, hidden)
            total = total + cfg.chat_rows_weight * rows
            out["rows_loss"] = rows.item()
        _step(self.optimizer, lr_at(step, cfg), total, cfg.grad_clip)
        for family, (c, t) in counts.items():
            out[f"first_{family[:4]}"] = c / t
        return out

    def _rows_loss(self, batch: Batch, hidden: Sequence[torch.Tensor]) -> torch.Tensor:
        """Mean over the decoder's layers of the squared distance, relative to the
        teacher's squared norm, between its hidden states on the batch's image
        chats (``hidden``, from ``chat_losses``) and on the same chats with the
        scenes' symbolic rows in place of the image (no gradient): the image
        should drive the decoder as the rows it learnt on do. With
        ``chat_rows_positions`` "objects" only the object tokens and the
        positions predicting an answer are compared."""
        image_token = self.model.config.image_token_index
        embeds = []
        mask = batch.attention_mask.bool()
        if self.cfg.chat_rows_positions == "objects":
            mask = torch.zeros_like(mask)
            for row, query, _, _ in batch.looks:
                mask[row, query] = True
        for row, (ids, scene) in enumerate(
            zip(batch.input_ids.tolist(), batch.scenes, strict=True)
        ):
            kinds, labels = packed_layout(scene, token_labels(scene))
            first = ids.index(image_token)
            if ids.count(image_token) != kinds.numel():
                raise RuntimeError("the processor's image placeholders and the rows differ")
            embeds.append(self.symbolic_embeddings(ids, first, kinds, labels))
            if self.cfg.chat_rows_positions == "objects":
                mask[row, first + (kinds == OBJECT).nonzero().squeeze(1).to(mask.device)] = True
        with torch.no_grad():
            teacher = self.model.model.language_model(
                inputs_embeds=torch.stack(embeds),
                attention_mask=batch.attention_mask,
                use_cache=False,
                output_hidden_states=True,
            ).hidden_states
        terms = [
            (s[mask] - t[mask]).pow(2).sum() / t[mask].pow(2).sum()
            for s, t in zip(hidden[1:], teacher[1:], strict=True)
        ]
        return torch.stack(terms).mean()

    def _probe(self) -> None:
        """Greedy accuracy on the first ``probe_n`` eval questions (progress only)."""
        report = evaluate(self.model, self.processor, make_split("eval", self.cfg.probe_n))
        self.say(f"probe eval ({report['n']}): {report['accuracy']:.4f} {report['per_family']}")
        self.history.append({"step": self.step, "probe": report["accuracy"]})


def _in_decoder(name: str) -> bool:
    """Whether ``LlavaNextForConditionalGeneration`` parameter ``name`` is the
    decoder's (language model or LM head) rather than the image path's."""
    return name.startswith(("model.language_model.", "lm_head."))


def scaled_gradient(x: torch.Tensor, weight: float) -> torch.Tensor:
    """``x`` in value, with the gradient flowing back into ``x`` scaled by ``weight``
    (0: detached): the token heads learn at full rate whatever share of their
    loss reaches the tower."""
    still = x.detach()
    return still + weight * (x - still) if weight else still


def attention_targets(where: Sequence[int], family: str, count_sink: bool) -> list[int]:
    """Positions the supervised heads are pulled onto for one answer: its evidence
    ``where``, and for a count with ``count_sink`` the row's first token too (BOS,
    position 0 in every right-padded row), so that the share of attention left
    on it, 1/(n+1), tells how many objects were found."""
    return [*where, 0] if count_sink and family == "count" else list(where)


def count_shares(n: int, odds: float) -> list[float]:
    """A count head's target shares over ``attention_targets``' n counted objects
    and BOS: BOS ``odds`` times each object's, so more than half of it exactly
    when ``n < odds``."""
    return [1 / (odds + n)] * n + [odds / (odds + n)]


def relation_targets(where: Sequence[int], turn: Turn) -> list[list[int]]:
    """Per side in ``RELATIONS`` order, the positions that side's relation head is
    pulled onto for relation ``turn``: the named object ``where`` for the side
    the question asks, BOS (position 0) for the others."""
    side = question_keys(turn)[2] - 1
    if turn.family != "relation" or side < 0:
        raise ValueError(f"not a relation question: {turn.question!r}")
    return [list(where) if s == side else [0] for s in range(len(RELATIONS))]


def _symbolic_phase(step: int, cfg: TrainConfig) -> tuple[int, str | None]:
    """(first step, block family or None for mixed) of the stage-0 phase holding
    ``step``: mixed, then the blocks one after another, then mixed again."""
    start, family = 0, None
    end = cfg.symbolic_blocks_start
    for steps, index in zip(cfg.symbolic_block_steps, cfg.symbolic_block_families, strict=True):
        if step < end:
            break
        start, family = end, FAMILIES[index]
        end += steps
    if step >= end:
        start, family = end, None
    return start, family


def symbolic_family(step: int, cfg: TrainConfig) -> str | None:
    """The one family symbolic step ``step`` asks about, or None (all, mixed)."""
    return _symbolic_phase(step, cfg)[1]


def symbolic_phase_start(step: int, cfg: TrainConfig) -> int:
    """The first step of the stage-0 phase (mixed, or a block) that holds ``step``."""
    return _symbolic_phase(step, cfg)[0]


def symbolic_chats(
    step: int, family: str | None, cfg: TrainConfig
) -> list[tuple[Scene, list[Turn]]]:
    """The (scene, turns) rows of symbolic step ``step``: ``symbolic_batch`` chats of
    ``symbolic_turns`` mixed questions, or in a block (``family``) as many
    single-turn chats of that family plus ``symbolic_replay_rows`` single-turn
    chats cycling through every family."""
    first = step * cfg.symbolic_batch
    if family is None:
        turns = cfg.symbolic_turns if step < cfg.symbolic_blocks_start else cfg.symbolic_tail_turns
        return [
            symbolic_scene(index, cfg.seed, turns - 1, None)
            for index in range(first, first + cfg.symbolic_batch)
        ]
    # symbolic_scene cycles FAMILIES by index: these indices are all of ``family``.
    focus = [
        symbolic_scene(index * len(FAMILIES) + FAMILIES.index(family), cfg.seed, 0, None)
        for index in range(first, first + cfg.symbolic_batch)
    ]
    replay_first = step * cfg.symbolic_replay_rows
    replay = [
        symbolic_scene(index, cfg.seed ^ 0x5EED, 0, None)  # its own stream of scenes
        for index in range(replay_first, replay_first + cfg.symbolic_replay_rows)
    ]
    return focus + replay


def channel_words(tokenizer) -> dict[int, list[int]]:
    """Token id of the word of every class of the colour, shape and letter channels
    (in ``CHANNELS`` order), as questions and answers spell it (" red")."""
    names = [n for n, _ in CHANNELS]
    words = {"colour": list(COLOURS), "shape": list(SHAPES), "letter": list(LETTERS)}
    out = {}
    for name, classes in words.items():
        ids = [tokenizer(f" {w}", add_special_tokens=False)["input_ids"] for w in classes]
        if any(len(i) != 1 for i in ids):
            raise ValueError(f"the scene tokenizer splits a {name} word: {classes} -> {ids}")
        out[names.index(name)] = [i[0] for i in ids]
    return out


def symbolic_background(step: int, cfg: TrainConfig) -> float:
    """Probability of keeping a background row at symbolic step ``step``: 0 until the
    last ``symbolic_background_steps``, then rising linearly to 1."""
    start = cfg.symbolic_steps - cfg.symbolic_background_steps
    if step < start:
        return 0.0
    return min(1.0, (step - start) / max(1.0, cfg.symbolic_background_steps - 1))


def _int_tuple(text: str) -> tuple[int, ...]:
    """``"0,1,-1"`` -> ``(0, 1, -1)`` (the curriculum flag)."""
    return tuple(int(x) for x in text.split(","))


def _float_tuple(text: str) -> tuple[float, ...]:
    """``"1.5,2.5"`` -> ``(1.5, 2.5)``; ``""`` -> ``()`` (off)."""
    return tuple(float(x) for x in text.split(",")) if text else ()


def _flag(text: str) -> bool:
    """``"true"``/``"false"`` (any case, or 1/0) -> bool; argparse's ``bool`` takes
    every non-empty string as True."""
    if text.lower() in ("true", "1"):
        return True
    if text.lower() in ("false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.train_grid")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--state", type=Path, required=True, help="resumable state (outside git)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--branch-from",
        type=Path,
        help=f"start a new --state from another run's {STAGE_0_STATE} or {STAGE_1_STATE} "
        "(its configuration differs only in fields read after that stage, AFTER_STAGE_0 or "
        "AFTER_STAGE_1)",
    )
    parser.add_argument(
        "--stop-at",
        type=int,
        help="stop at this step (vision steps count first) and export that interim model; "
        "the schedule is the full run's, so the same command without it resumes to the end",
    )
    for field in fields(TrainConfig):
        value = getattr(defaults, field.name)
        kind = (
            (_float_tuple if "float" in str(field.type) else _int_tuple)
            if isinstance(value, tuple)
            else _flag
            if isinstance(value, bool)
            else type(value)
        )
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=value)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(**{f: getattr(args, f) for f in asdict(defaults)})
    command = shlex.join(
        [Path(sys.executable).name, "-m", "benchmarks.quality.train_grid", *sys.argv[1:]]
    )
    trainer = Trainer(cfg, args.state, torch.device(args.device), args.branch_from)
    trainer.say(
        f"model: {sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f} M parameters; "
        f"{cfg.symbolic_steps} symbolic, {cfg.vision_steps} vision, "
        f"{cfg.steps} chat steps of {cfg.batch}"
    )
    seconds = trainer.run(args.stop_at)
    model, processor = trainer.model.cpu(), trainer.processor
    save_checkpoint(model, processor, args.out)
    reloaded, reloaded_processor = load_checkpoint(args.out)
    eval_start = time.monotonic()
    report = evaluate(reloaded, reloaded_processor, make_split("eval", cfg.eval_n, cfg.seed))
    answers = report.pop("answers")
    test = evaluate(reloaded, reloaded_processor, make_split("eval", cfg.test_n, cfg.seed))
    trainer.say(f"eval (HF float32, saved weights, {report['n']}): {report['accuracy']:.4f}")
    trainer.say(f"per family: {report['per_family']}")
    record = {
        "command": command,
        "generator": "benchmarks.quality.grid_scenes",
        "config": asdict(cfg),
        "spec": SPEC.to_json_dict(),
        "store_dtype": STORE_DTYPE,
        "device": args.device,
        "step": trainer.step,
        "planned_steps": cfg.symbolic_steps + cfg.vision_steps + cfg.steps,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_wall_seconds": round(seconds, 1),
        "eval_wall_seconds": round(time.monotonic() - eval_start, 1),
        "history": trainer.history,
        "eval_hf_float32": report,
        "eval_answers": answers,
        "test_subset": {k: test[k] for k in ("n", "accuracy", "answers")},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} thread(s)",
    }
    (args.out / "TRAINING.json").write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
