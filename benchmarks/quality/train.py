"""Train the small LLaVA-NeXT of the quality benchmark on generated scenes (CPU, seeded).

    .venv/bin/python -m benchmarks.quality.train [--out benchmarks/quality/model]

Pruning can only be judged on a model that has learned to read its image
(DESIGN.md section 4). This script trains, from scratch and end to end, a
LLaVA-NeXT with exactly the architecture vLLM serves
(``LlavaNextForConditionalGeneration``: CLIP vision tower, MLP projector,
Llama decoder, anyres tiles, image-newline tokens) on
``benchmarks/quality/scenes.py``'s train split, and writes a checkpoint that
HF transformers and vLLM 0.32 both load (the llava-hf weight layout of
``trio_dev.checkpoints``). The defaults are the shipped checkpoint's run
(``benchmarks/quality/model/TRAINING.json`` records the command, every
hyper-parameter, the loss curve and the eval accuracy): about 35 minutes on
one core of this machine.

Why it looks the way it does:

* **Size.** CLIP tiles of 84 px with 14 px patches (6x6 tokens per tile),
  pinpoints up to 2x2 or 1x3 tiles: a 224x224 scene becomes about 190 visual
  tokens, an object covers a handful of them. The decoder is 4 Llama layers
  of width 128 (4 heads of 32, the head size vLLM's CPU attention needs), so
  the harness can compare pruning depths 0-2. 1.77 M parameters, 3.5 MB in
  float16.
* **Two stages.** (1) ``pretrain_vision``: the CLIP tower alone learns, per
  visual token, the colour, shape and word drawn on it (label maps rendered
  with each scene, ``patch_labels``), 1,200 steps of 16 images. (2) The whole
  model trains on chats, with the answer loss plus the same per-token
  supervision on the projected visual tokens (``AuxHeads``). Without them
  the model never left answering from the question's priors (see
  ``AuxHeads``).
* **Multi-turn conversations.** Each training image comes with its split
  question first (the evaluation prompt, verbatim) and then several more
  questions about the same image as later chat turns
  (``scenes.make_conversation``). Encoding the image and running the decoder
  over the visual tokens dominates the cost; extra turns add ~15 tokens each
  and multiply the supervised answers per image. Loss: cross-entropy on the
  answer tokens and their ``</s>`` only. The first 30% of the steps use
  bigger objects (``scenes.EASY_STYLE``).
* **Fresh samples.** Step ``s`` uses train samples ``s*B .. s*B+B-1`` (no
  sample is seen twice; the vision stage uses later indices), generated and
  processed on the fly by the same ``LlavaNextProcessor`` that is saved with
  the checkpoint, so training and serving see identical pixels and token
  counts.
* **Reproducible.** One seed fixes the initial weights and the data; each
  worker runs one torch thread. The weights depend on ``--workers`` (how a
  batch is split), not on the machine's load.
* **Storage.** Weights are stored in float16 (halves the size; float16 keeps
  3 more mantissa bits than bfloat16), the config says float32 so that both
  HF and vLLM compute in float32 unless told otherwise.
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trio_dev.checkpoints import (
    EOS_TOKEN,
    WEIGHTS_NAME,
    CheckpointSpec,
    _finish_tokenizer_config,
    _save_weights,
    build_config,
    build_processor,
    build_tokenizer,
)

from .scenes import (
    COLOURS,
    FAMILIES,
    LABEL_STEP,
    SHAPES,
    WORDS,
    Sample,
    Turn,
    chat_prompt,
    make_conversation,
    normalize_answer,
)

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from transformers import (
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
        PreTrainedTokenizerFast,
    )

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "benchmarks" / "quality" / "model"

#: The trained model's shape. See the module docstring for why these numbers.
SPEC = CheckpointSpec(
    name="scenes",
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,  # head size 32: vLLM's CPU attention needs a multiple of 32
    num_key_value_heads=4,  # plain multi-head attention, as Vicuna-7B
    intermediate_size=352,  # ~2.7x, Vicuna-7B's MLP ratio
    max_position_embeddings=2048,
    vision_image_size=84,
    vision_patch_size=14,  # 6x6 patches (+ CLS) per tile
    vision_hidden_size=128,
    vision_num_hidden_layers=3,  # feature layer -2: the last layer is unused, as in LLaVA
    vision_num_attention_heads=4,
    vision_intermediate_size=512,
    image_grid_pinpoints=((84, 168), (168, 84), (168, 168), (84, 252), (252, 84)),
    dtype="float32",
    text_init_std=0.02,
)
STORE_DTYPE = "float16"


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters (all recorded in TRAINING.json)."""

    seed: int = 0
    steps: int = 3000
    batch: int = 8
    extra_turns: int = 12
    easy_fraction: float = 0.3
    lr: float = 2e-3
    warmup: int = 30
    decay_fraction: float = 0.25
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_n: int = 300
    #: Weight of the visual-token loss (``AuxHeads``) next to the answer loss.
    aux_weight: float = 1.0
    #: Vision-tower warm-up (``pretrain_vision``): steps, images per step, peak lr.
    vision_steps: int = 1200
    vision_batch: int = 16
    vision_lr: float = 1e-3
    #: Also write the checkpoint every this many steps (0: only at the end).
    save_every: int = 0
    workers: int = 1
    threads: int = 1


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #


@dataclass
class Batch:
    """One padded training batch (right padding; labels -100 outside answers)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor
    image_sizes: torch.Tensor
    #: (row, position, family) of the first token of every answer.
    first_tokens: list[tuple[int, int, str]]
    #: Ground truth of every visual token of every real tile, in the order HF's
    #: ``get_image_features`` concatenates them: (tiles, patches, 3) with
    #: colour / shape / word class (0 = background).
    patch_labels: torch.Tensor


#: Classes of each ground-truth channel (background + objects).
AUX_CLASSES: tuple[int, int, int] = (len(COLOURS) + 1, len(SHAPES) + 1, len(WORDS) + 1)
#: A patch gets an object's class if at least this share of its pixels shows it.
AUX_MIN_COVER = 0.15


def patch_labels(processor: LlavaNextProcessor, labels: Image.Image) -> torch.Tensor:
    """Per visual token class labels of a label map: (tiles, patches, 3), long.

    The map goes through the same LLaVA-NeXT image processor as the image
    (same resize, padding and tiling, so the same geometry) with nearest
    resampling and no rescaling, so class values survive. Each CLIP patch gets,
    per channel, the most frequent object class if it covers at least
    ``AUX_MIN_COVER`` of the patch, else background.
    """
    import torch
    from PIL import Image as PILImage

    tiles = processor.image_processor(
        images=labels,
        do_normalize=False,
        do_rescale=False,
        resample=PILImage.Resampling.NEAREST,
        return_tensors="pt",
    )["pixel_values"][0]
    n, channels, height, width = tiles.shape
    patch = SPEC.vision_patch_size
    rows, cols = height // patch, width // patch
    classes = (tiles.long() + LABEL_STEP // 2) // LABEL_STEP
    classes = classes.view(n, channels, rows, patch, cols, patch).permute(0, 2, 4, 1, 3, 5)
    classes = classes.reshape(n, rows * cols, channels, patch * patch)
    counts = torch.nn.functional.one_hot(classes.clamp(max=max(AUX_CLASSES) - 1), max(AUX_CLASSES))
    counts = counts.sum(-2)[..., 1:]  # (n, patches, channels, classes - 1): object pixels
    best = counts.max(-1)
    covered = best.values >= AUX_MIN_COVER * patch * patch
    return torch.where(covered, best.indices + 1, 0)


def encode_conversation(
    processor: LlavaNextProcessor, sample: Sample, extra: Sequence[Turn]
) -> tuple[list[int], list[int], torch.Tensor, torch.Tensor, list[tuple[int, str]], torch.Tensor]:
    """Token ids, labels, pixel values, image size and answer starts of one chat.

    The first turn is ``chat_prompt(question)`` tokenized by the processor
    (which adds BOS and expands ``<image>``), exactly as at evaluation time.
    Later pieces follow ``CHAT_TEMPLATE``: ``" {answer}</s>"`` after each
    ``ASSISTANT:`` and ``"USER: {question} ASSISTANT:"`` for each further turn.
    They are tokenized one by one (``add_special_tokens=False``); every piece
    boundary is a pre-tokenizer boundary, so the ids equal those of the whole
    string (checked in ``check_tokenization``).
    """
    tokenizer = processor.tokenizer
    enc = processor(images=sample.image, text=chat_prompt(sample.question), return_tensors="pt")
    ids: list[int] = enc["input_ids"][0].tolist()
    labels = [-100] * len(ids)
    starts: list[tuple[int, str]] = []
    turns = [Turn(sample.question, sample.answer, sample.family), *extra]
    for i, turn in enumerate(turns):
        if i > 0:
            prompt = tokenizer(f"USER: {turn.question} ASSISTANT:", add_special_tokens=False)
            ids += prompt["input_ids"]
            labels += [-100] * len(prompt["input_ids"])
        answer = tokenizer(f" {turn.answer}{EOS_TOKEN}", add_special_tokens=False)["input_ids"]
        starts.append((len(ids), turn.family))
        ids += answer
        labels += answer
    if sample.labels is None:
        raise ValueError("training samples need their label map (make_conversation)")
    pixels = enc["pixel_values"][0]
    aux = patch_labels(processor, sample.labels)
    if aux.shape[0] != pixels.shape[0]:
        raise RuntimeError(f"label map has {aux.shape[0]} tiles, the image {pixels.shape[0]}")
    return ids, labels, pixels, enc["image_sizes"][0], starts, aux


def conversation_text(sample: Sample, extra: Sequence[Turn]) -> str:
    """The whole chat as one string (what ``encode_conversation`` tokenizes piecewise)."""
    text = f"{chat_prompt(sample.question)} {sample.answer}{EOS_TOKEN}"
    for turn in extra:
        text += f"USER: {turn.question} ASSISTANT: {turn.answer}{EOS_TOKEN}"
    return text


def make_batch(
    processor: LlavaNextProcessor, step: int, cfg: TrainConfig, rank: int = 0, world: int = 1
) -> Batch:
    """Rank ``rank``'s share of batch ``step`` (train samples ``step*B .. step*B+B-1``).

    The first ``easy_fraction`` of the steps draw from the easy style (bigger
    objects), the rest from the evaluation distribution.
    """
    import torch

    rows = []
    easy = step < cfg.easy_fraction * cfg.steps
    for index in range(step * cfg.batch + rank, (step + 1) * cfg.batch, world):
        sample, extra = make_conversation("train", index, cfg.seed, cfg.extra_turns, easy)
        rows.append(encode_conversation(processor, sample, extra))
    length = max(len(r[0]) for r in rows)
    patches = max(r[2].shape[0] for r in rows)
    pad_id = processor.tokenizer.pad_token_id
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    pixels = torch.zeros((len(rows), patches, *rows[0][2].shape[1:]))
    first_tokens = []
    for i, (ids, lab, pix, _, starts, _) in enumerate(rows):
        first_tokens += [(i, pos, family) for pos, family in starts]
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
        pixels[i, : pix.shape[0]] = pix
    sizes = torch.stack([r[3] for r in rows])
    aux = torch.cat([r[5] for r in rows])
    return Batch(input_ids, mask, labels, pixels, sizes, first_tokens, aux)


def check_tokenization(processor: LlavaNextProcessor, seed: int) -> None:
    """Piecewise tokenization equals tokenizing the whole templated chat.

    Also checks that ``chat_prompt`` is what the chat template renders (minus
    BOS), so the chat API of vLLM and plain prompts give the same tokens.
    """
    tokenizer = processor.tokenizer
    sample, extra = make_conversation("train", 0, seed, 3)
    ids = encode_conversation(processor, sample, extra)[0]
    whole = processor(images=sample.image, text=conversation_text(sample, extra))["input_ids"][0]
    if list(whole) != ids:
        raise RuntimeError("piecewise tokenization differs from whole-string tokenization")
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]}
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if rendered != tokenizer.bos_token + chat_prompt(sample.question):
        raise RuntimeError(f"chat_prompt differs from the chat template: {rendered!r}")


# --------------------------------------------------------------------------- #
# Model, loss, schedule
# --------------------------------------------------------------------------- #


def build_model(seed: int) -> LlavaNextForConditionalGeneration:
    """Seeded fresh model with transformers' initialisers (std 0.02 for the text part)."""
    import torch
    from transformers import LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    return LlavaNextForConditionalGeneration(build_config(SPEC))


class AuxHeads:
    """Training-only probes of what each visual token shows (never saved).

    One small MLP per label channel (colour, shape, written word) reads a
    visual token and predicts its class (0 = background). Their loss is
    balanced: the mean cross-entropy over background tokens plus the mean over
    object tokens, so the few object tokens are not drowned by the
    background. Why it exists: from scratch, the answer loss alone leaves a
    small LLaVA-NeXT answering from the question's priors (measured: colour
    and shape at chance after 575 steps of 8 chats), and even with a linear
    probe the CLIP tower did not learn shapes (object-token shape accuracy
    stuck at 31%, the majority class, after 400 steps of 32 images), while an
    MLP probe on the same tower learns them. The served model is unchanged:
    same architecture, same weight layout; the probes are dropped.
    """

    def __init__(self, hidden: int, width: int = 256) -> None:
        import torch

        self.heads = torch.nn.ModuleList(
            torch.nn.Sequential(
                torch.nn.Linear(hidden, width), torch.nn.GELU(), torch.nn.Linear(width, c)
            )
            for c in AUX_CLASSES
        )

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.heads.parameters())

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return list(self.heads.named_parameters(prefix="aux"))

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """Balanced loss over channels and, per channel, accuracy on object tokens.

        ``tokens`` (tiles, patches, hidden), ``labels`` (tiles, patches, 3).
        """
        import torch.nn.functional as F

        if tokens.shape[:2] != labels.shape[:2]:
            raise RuntimeError(
                f"visual tokens {tuple(tokens.shape)} vs labels {tuple(labels.shape)}"
            )
        flat = tokens.reshape(-1, tokens.shape[-1])
        total = flat.new_zeros(())
        accuracy = []
        for c, head in enumerate(self.heads):
            logits = head(flat).float()
            target = labels[..., c].reshape(-1)
            obj = target > 0
            total = total + F.cross_entropy(logits[~obj], target[~obj])
            if obj.any():
                total = total + F.cross_entropy(logits[obj], target[obj])
                accuracy.append((logits[obj].argmax(-1) == target[obj]).float().mean().item())
            else:
                accuracy.append(float("nan"))
        return total / len(self.heads), accuracy


def answer_loss(
    model: LlavaNextForConditionalGeneration, batch: Batch, aux: AuxHeads | None = None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, tuple[int, int]]]:
    """Cross-entropy of the answer tokens, the visual-token loss, first-token hits.

    Logits are computed only where needed. Also returns, per family, how many
    answers' first tokens the model already predicts (argmax) and out of how
    many: a free training-accuracy signal. The visual-token loss is zero
    without ``aux``.
    """
    import torch
    import torch.nn.functional as F

    captured: list[torch.Tensor] = []
    hook = model.model.multi_modal_projector.register_forward_hook(
        lambda _module, _inputs, output: captured.append(output)
    )
    try:
        out = model.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=batch.pixel_values,
            image_sizes=batch.image_sizes,
            use_cache=False,
        )
    finally:
        hook.remove()
    hidden = out.last_hidden_state[:, :-1]
    targets = batch.labels[:, 1:]
    keep = targets != -100
    logits = model.lm_head(hidden[keep]).float()
    loss = F.cross_entropy(logits, targets[keep])
    visual = aux.loss(captured[0], batch.patch_labels)[0] if aux else loss.new_zeros(())
    with torch.no_grad():
        rows = torch.tensor([r for r, _, _ in batch.first_tokens])
        positions = torch.tensor([p for _, p, _ in batch.first_tokens])
        first = model.lm_head(out.last_hidden_state[rows, positions - 1]).argmax(-1)
        hits = (first == batch.input_ids[rows, positions]).tolist()
    counts: dict[str, tuple[int, int]] = {}
    for (_, _, family), hit in zip(batch.first_tokens, hits, strict=True):
        c, t = counts.get(family, (0, 0))
        counts[family] = (c + int(hit), t + 1)
    return loss, visual, counts


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Warm-up, constant, then linear decay to ``min_lr_ratio * lr`` ("WSD").

    A long constant phase suits a model that sits on a plateau (answering from
    the question alone) until it starts reading the image; the final decay
    then settles the weights.
    """
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    decay_start = cfg.steps * (1 - cfg.decay_fraction)
    if step < decay_start:
        return cfg.lr
    progress = (step - decay_start) / max(1.0, cfg.steps - decay_start)
    return cfg.lr * (1 - (1 - cfg.min_lr_ratio) * progress)


# --------------------------------------------------------------------------- #
# Evaluation (HF, greedy)
# --------------------------------------------------------------------------- #


def greedy_answer(
    model: LlavaNextForConditionalGeneration,
    processor: LlavaNextProcessor,
    sample: Sample,
    max_new_tokens: int = 4,
) -> str:
    """HF greedy decoding of one sample's single-turn prompt (no padding)."""
    import torch

    enc = processor(images=sample.image, text=chat_prompt(sample.question), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
    return processor.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def evaluate_counts(
    model: LlavaNextForConditionalGeneration,
    processor: LlavaNextProcessor,
    samples: Sequence[Sample],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Correct and total answers per family (in ``FAMILIES`` order), HF greedy.

    Correct means the normalized first word equals the answer.
    """
    import torch

    was_training = model.training
    model.eval()
    correct = torch.zeros(len(FAMILIES))
    total = torch.zeros(len(FAMILIES))
    for sample in samples:
        prediction = normalize_answer(greedy_answer(model, processor, sample))
        index = FAMILIES.index(sample.family)
        total[index] += 1
        correct[index] += float(prediction == sample.answer)
    model.train(was_training)
    return correct, total


def accuracy_report(correct: dict[str, int], total: dict[str, int]) -> dict[str, Any]:
    """``{"n", "accuracy", "per_family": {family: accuracy}}`` from counts."""
    n = sum(total.values())
    return {
        "n": n,
        "accuracy": round(sum(correct.values()) / max(1, n), 4),
        "per_family": {f: round(correct[f] / total[f], 4) for f in FAMILIES if total[f]},
    }


# --------------------------------------------------------------------------- #
# Saving
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
    import torch
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model, info = LlavaNextForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v and k != "mismatched_keys"}
    if problems or info.get("mismatched_keys"):
        raise RuntimeError(f"checkpoint {model_dir} did not load cleanly: {info}")
    return model.eval(), AutoProcessor.from_pretrained(model_dir)


# --------------------------------------------------------------------------- #
# Driver
# --------------------------------------------------------------------------- #


def train(cfg: TrainConfig, out_dir: Path, command: str) -> None:
    """Train with ``cfg.workers`` single-threaded processes (see ``_worker``)."""
    if cfg.workers == 1:
        _worker(0, cfg, out_dir, command, "")
        return
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="trio-train-") as tmp:
        init_method = f"file://{Path(tmp) / 'rendezvous'}"
        mp.spawn(_worker, args=(cfg, out_dir, command, init_method), nprocs=cfg.workers)


def pretrain_vision(
    model: LlavaNextForConditionalGeneration,
    processor: LlavaNextProcessor,
    cfg: TrainConfig,
    rank: int,
    world: int,
    say: Callable[[str], None],
) -> None:
    """Teach the CLIP tower what is drawn where before the decoder trains.

    Only the vision tower and ``AuxHeads`` probes on its selected feature
    layer (the tokens the projector reads) train here, on whole images of the
    train split (indices above any stage-2 chat, so no image repeats); the
    decoder waits. Shapes are the slow part: a token on an object has to
    learn the object's outline from its neighbours. Measured on this machine:
    an MLP probe on the tower goes from chance (30%) to 53% shape accuracy on
    object tokens in 300 steps of 16 images, where the joint training never
    left chance. Cheap: the tower is small and no text is processed.
    """
    import torch

    tower = model.model.vision_tower
    probes = AuxHeads(SPEC.vision_hidden_size)
    params = [*tower.parameters(), *probes.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=cfg.weight_decay)
    first_index = (cfg.steps + 1) * cfg.batch
    recent: list[list[float]] = []
    for step in range(cfg.vision_steps):
        pixels, labels = [], []
        base = first_index + step * cfg.vision_batch
        for index in range(base + rank, base + cfg.vision_batch, world):
            sample, _ = make_conversation("train", index, cfg.seed, 0)
            enc = processor.image_processor(images=sample.image, return_tensors="pt")
            pixels.append(enc["pixel_values"][0])
            labels.append(patch_labels(processor, sample.labels))
        hidden = tower(torch.cat(pixels), output_hidden_states=True).hidden_states
        tokens = hidden[SPEC.vision_feature_layer][:, 1:]  # the "default" strategy drops CLS
        loss, accuracy = probes.loss(tokens, torch.cat(labels))
        stats = loss.detach().reshape(1)
        lr = cfg.vision_lr * min(1.0, (step + 1) / cfg.warmup)
        _update(optimizer, lr, loss, tower, probes, stats, world, cfg.grad_clip)
        recent.append(accuracy)
        if (step + 1) % 50 == 0 or step == cfg.vision_steps - 1:
            mean = torch.tensor(recent).nanmean(0).tolist()
            recent.clear()
            say(
                f"vision step {step + 1:4d}  loss {stats.item() / world:.4f}  object-token "
                f"accuracy: colour {mean[0]:.2f} shape {mean[1]:.2f} word {mean[2]:.2f}"
            )


def _worker(rank: int, cfg: TrainConfig, out_dir: Path, command: str, init_method: str) -> None:
    """One data-parallel rank: its share of every batch, gradients averaged.

    Why processes and not threads: on this 2-core machine, shared with other
    work, ``torch.set_num_threads(2)`` made a training step about 8x *slower*
    than one thread (measured: OpenMP's barriers wait for a thread that is
    not running; element-wise ops went from 2 ms to 12 ms). Two single-
    threaded ranks synchronise once per step (one all-reduce of the
    gradients, gloo) and use both cores without that penalty. The result
    depends on ``workers`` (how a batch is split), not on the machine's load.
    """
    import torch
    import torch.distributed as dist
    import transformers

    from .scenes import make_split

    world = cfg.workers
    if world > 1:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    torch.set_num_threads(cfg.threads)
    start = time.monotonic()
    cpu_start = time.process_time()
    say = (lambda message: log(start, message)) if rank == 0 else (lambda message: None)
    tokenizer: PreTrainedTokenizerFast = build_tokenizer(SPEC)
    processor = build_processor(SPEC, tokenizer)
    check_tokenization(processor, cfg.seed)
    model = build_model(cfg.seed).train()
    params = sum(p.numel() for p in model.parameters())
    say(
        f"model: {params / 1e6:.2f} M parameters; {cfg.steps} steps of {cfg.batch} chats "
        f"on {world} worker(s)"
    )
    torch.manual_seed(cfg.seed + 1)
    if cfg.vision_steps:
        pretrain_vision(model, processor, cfg, rank, world, say)
    aux = AuxHeads(SPEC.hidden_size) if cfg.aux_weight > 0 else None
    named = [*model.named_parameters(), *(aux.named_parameters() if aux else ())]
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if p.ndim < 2 or "embed" in n]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
    )
    history: list[dict[str, Any]] = []
    smoothed = None
    hits = torch.zeros(2, len(FAMILIES))
    for step in range(cfg.steps):
        batch = make_batch(processor, step, cfg, rank, world)
        loss, visual, counts = answer_loss(model, batch, aux)
        stats = torch.zeros(2 + 2 * len(FAMILIES))
        stats[0], stats[1] = loss.detach(), visual.detach()
        for i, family in enumerate(FAMILIES):
            stats[2 + i], stats[2 + len(FAMILIES) + i] = counts.get(family, (0, 0))
        total = loss + cfg.aux_weight * visual
        _update(optimizer, lr_at(step, cfg), total, model, aux, stats, world, cfg.grad_clip)
        value, visual_value = stats[0].item() / world, stats[1].item() / world
        hits += stats[2:].view(2, -1)
        smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
        if step % 25 == 0 or step == cfg.steps - 1:
            first = " ".join(
                f"{f[:4]} {hits[0, i] / max(1.0, hits[1, i].item()):.2f}"
                for i, f in enumerate(FAMILIES)
            )
            say(
                f"step {step:5d}  loss {value:.4f}  smoothed {smoothed:.4f}  "
                f"visual {visual_value:.4f}  first: {first}"
            )
            hits.zero_()
            history.append(
                {
                    "step": step,
                    "loss": round(value, 4),
                    "smoothed": round(smoothed, 4),
                    "visual": round(visual_value, 4),
                }
            )
        if rank == 0 and cfg.save_every and (step + 1) % cfg.save_every == 0:
            save_checkpoint(model, processor, out_dir)  # resumable evidence of progress
    train_seconds = time.monotonic() - start

    if rank == 0:
        save_checkpoint(model, processor, out_dir)
    if world > 1:
        dist.barrier()
    reloaded, reloaded_processor = load_checkpoint(out_dir)
    eval_samples = make_split("eval", cfg.eval_n, cfg.seed)
    correct, total = evaluate_counts(reloaded, reloaded_processor, eval_samples[rank::world])
    cpu = torch.tensor([time.process_time() - cpu_start])
    if world > 1:
        dist.all_reduce(correct)
        dist.all_reduce(total)
        dist.all_reduce(cpu)
    report = accuracy_report(
        {f: int(correct[i]) for i, f in enumerate(FAMILIES)},
        {f: int(total[i]) for i, f in enumerate(FAMILIES)},
    )
    say(f"eval (HF float32, saved weights, {report['n']}): {report['accuracy']:.4f}")
    say(f"per family: {report['per_family']}")
    if rank == 0:
        record = {
            "command": command,
            "seed": cfg.seed,
            "config": cfg.__dict__,
            "spec": SPEC.to_json_dict(),
            "store_dtype": STORE_DTYPE,
            "parameters": params,
            "steps": cfg.steps,
            "train_conversations": cfg.steps * cfg.batch,
            "train_wall_seconds": round(train_seconds, 1),
            "total_wall_seconds": round(time.monotonic() - start, 1),
            "total_cpu_seconds_all_workers": round(cpu.item(), 1),
            "final_train_loss": round(smoothed or float("nan"), 4),
            "loss_history": history,
            "eval_hf_float32": report,
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        }
        (out_dir / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n")
    if world > 1:
        dist.destroy_process_group()


def _update(
    optimizer: torch.optim.Optimizer,
    lr: float,
    loss: torch.Tensor,
    model: torch.nn.Module,
    aux: AuxHeads | None,
    stats: torch.Tensor,
    world: int,
    grad_clip: float,
) -> None:
    """One optimiser step on ``loss`` for the parameters of ``model`` and ``aux``
    (both stages): gradients averaged over ranks with ``stats`` summed, clipped."""
    import torch

    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [*model.parameters(), *(aux.parameters() if aux else ())]
    if world > 1:
        _all_reduce_gradients(params, stats, world)
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()


def _all_reduce_gradients(
    params: list[torch.nn.Parameter], stats: torch.Tensor, world: int
) -> None:
    """Average gradients over ranks (one flat all-reduce) and sum ``stats``.

    Parameters without a gradient (the unused last CLIP layer) are the same on
    every rank and are skipped.
    """
    import torch
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads] + [stats])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g)).div_(world)
        offset += g.numel()
    stats.copy_(flat[offset:])


def log(start: float, message: str) -> None:
    """One progress line with the elapsed time."""
    print(f"[{time.monotonic() - start:7.1f}s] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quality.train",
        description="Train the quality benchmark's small LLaVA-NeXT on generated scenes (CPU).",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--extra-turns", type=int, default=defaults.extra_turns)
    parser.add_argument("--easy-fraction", type=float, default=defaults.easy_fraction)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--aux-weight", type=float, default=defaults.aux_weight)
    parser.add_argument("--vision-steps", type=int, default=defaults.vision_steps)
    parser.add_argument("--eval-n", type=int, default=defaults.eval_n)
    parser.add_argument("--save-every", type=int, default=defaults.save_every)
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    args = parser.parse_args(argv)
    cfg = TrainConfig(
        seed=args.seed,
        steps=args.steps,
        batch=args.batch,
        extra_turns=args.extra_turns,
        easy_fraction=args.easy_fraction,
        lr=args.lr,
        aux_weight=args.aux_weight,
        vision_steps=args.vision_steps,
        eval_n=args.eval_n,
        save_every=args.save_every,
        workers=args.workers,
        threads=args.threads,
    )
    command = shlex.join(
        [Path(sys.executable).name, "-m", "benchmarks.quality.train", *sys.argv[1:]]
    )
    train(cfg, args.out, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
