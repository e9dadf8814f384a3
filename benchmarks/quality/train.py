"""Train the small LLaVA-NeXT of the quality benchmark on generated scenes (CPU, seeded).

    .venv/bin/python -m benchmarks.quality.train [--out benchmarks/quality/model] \
        [--steps 900] [--batch 16] [--seed 0]

Pruning can only be judged on a model that has learned to read its image
(DESIGN.md section 4). This script trains, from scratch and end to end, a
LLaVA-NeXT with exactly the architecture vLLM serves
(``LlavaNextForConditionalGeneration``: CLIP vision tower, MLP projector,
Llama decoder, anyres tiles, image-newline tokens) on
``benchmarks/quality/scenes.py``'s train split, and writes a checkpoint that
HF transformers and vLLM 0.32 both load (the llava-hf weight layout of
``vllm_trio.checkpoints``).

Why it looks the way it does:

* **Size.** CLIP tiles of 112 px with 14 px patches (8x8 tokens per tile) and
  pinpoints up to 2x2 tiles: a 224x224 scene becomes 64 + 16x16 + 16 = 336
  visual tokens, objects cover a handful of them. The decoder is 6 Llama
  layers of width 128 (4 heads of 32, the head size vLLM's CPU attention
  needs), so the harness can compare pruning depths. About 1.7 M parameters:
  a few MB in float16, trainable on 2 CPU cores.
* **Multi-turn conversations.** Each training image comes with its split
  question first (the evaluation prompt, verbatim) and then several more
  questions about the same image as later chat turns
  (``scenes.make_conversation``). Encoding the image and running the decoder
  over ~350 visual tokens dominates the cost; extra turns add ~15 tokens each
  and multiply the supervised answers per image. Loss: cross-entropy on the
  answer tokens and their ``</s>`` only.
* **Fresh samples.** Step ``s`` uses train samples ``s*B .. s*B+B-1`` (no
  sample is seen twice), generated and processed on the fly by the same
  ``LlavaNextProcessor`` that is saved with the checkpoint, so training and
  serving see identical pixels and token counts.
* **Reproducible.** One seed fixes the initial weights and the data; torch
  runs with 2 threads (``torch.set_num_threads(2)``). Wall time depends on the
  machine's load; the weights do not.
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
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vllm_trio.checkpoints import (
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
    FAMILIES,
    Sample,
    Turn,
    chat_prompt,
    make_conversation,
    normalize_answer,
)

if TYPE_CHECKING:
    import torch
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
    num_hidden_layers=6,
    num_attention_heads=4,  # head size 32: vLLM's CPU attention needs a multiple of 32
    num_key_value_heads=4,  # plain multi-head attention, as Vicuna-7B
    intermediate_size=352,  # ~2.7x, Vicuna-7B's MLP ratio
    max_position_embeddings=2048,
    vision_image_size=112,
    vision_patch_size=14,  # 8x8 patches (+ CLS) per tile
    vision_hidden_size=128,
    vision_num_hidden_layers=3,  # feature layer -2: the last layer is unused, as in LLaVA
    vision_num_attention_heads=4,
    vision_intermediate_size=512,
    image_grid_pinpoints=((112, 224), (224, 112), (224, 224), (112, 336), (336, 112)),
    dtype="float32",
    text_init_std=0.02,
)
STORE_DTYPE = "float16"


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters (all recorded in TRAINING.json)."""

    seed: int = 0
    steps: int = 900
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
    eval_every: int = 0  # 0: only at the end
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


def encode_conversation(
    processor: LlavaNextProcessor, sample: Sample, extra: Sequence[Turn]
) -> tuple[list[int], list[int], torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
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
    return ids, labels, enc["pixel_values"][0], enc["image_sizes"][0], starts


def conversation_text(sample: Sample, extra: Sequence[Turn]) -> str:
    """The whole chat as one string (what ``encode_conversation`` tokenizes piecewise)."""
    text = f"{chat_prompt(sample.question)} {sample.answer}{EOS_TOKEN}"
    for turn in extra:
        text += f"USER: {turn.question} ASSISTANT: {turn.answer}{EOS_TOKEN}"
    return text


def make_batch(
    processor: LlavaNextProcessor, step: int, cfg: TrainConfig
) -> tuple[Batch, list[Sample]]:
    """Training batch ``step``: train samples ``step*B .. step*B+B-1`` as conversations.

    The first ``easy_fraction`` of the steps draw from the easy style (small
    images, big objects), the rest from the evaluation distribution.
    """
    import torch

    rows = []
    samples = []
    easy = step < cfg.easy_fraction * cfg.steps
    for index in range(step * cfg.batch, (step + 1) * cfg.batch):
        sample, extra = make_conversation("train", index, cfg.seed, cfg.extra_turns, easy)
        rows.append(encode_conversation(processor, sample, extra))
        samples.append(sample)
    length = max(len(r[0]) for r in rows)
    patches = max(r[2].shape[0] for r in rows)
    pad_id = processor.tokenizer.pad_token_id
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    pixels = torch.zeros((len(rows), patches, *rows[0][2].shape[1:]))
    first_tokens = []
    for i, (ids, lab, pix, _, starts) in enumerate(rows):
        first_tokens += [(i, pos, family) for pos, family in starts]
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
        pixels[i, : pix.shape[0]] = pix
    sizes = torch.stack([r[3] for r in rows])
    return Batch(input_ids, mask, labels, pixels, sizes, first_tokens), samples


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


def answer_loss(
    model: LlavaNextForConditionalGeneration, batch: Batch
) -> tuple[torch.Tensor, dict[str, tuple[int, int]]]:
    """Mean cross-entropy of the answer tokens (logits only where they are needed).

    Also returns, per family, how many answers' first tokens the model already
    predicts (argmax) and out of how many: a free training-accuracy signal.
    """
    import torch
    import torch.nn.functional as F

    out = model.model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        pixel_values=batch.pixel_values,
        image_sizes=batch.image_sizes,
        use_cache=False,
    )
    hidden = out.last_hidden_state[:, :-1]
    targets = batch.labels[:, 1:]
    keep = targets != -100
    logits = model.lm_head(hidden[keep]).float()
    loss = F.cross_entropy(logits, targets[keep])
    with torch.no_grad():
        rows = torch.tensor([r for r, _, _ in batch.first_tokens])
        positions = torch.tensor([p for _, p, _ in batch.first_tokens])
        first = model.lm_head(out.last_hidden_state[rows, positions - 1]).argmax(-1)
        hits = (first == batch.input_ids[rows, positions]).tolist()
    counts: dict[str, tuple[int, int]] = {}
    for (_, _, family), hit in zip(batch.first_tokens, hits, strict=True):
        c, t = counts.get(family, (0, 0))
        counts[family] = (c + int(hit), t + 1)
    return loss, counts


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


def evaluate_hf(
    model: LlavaNextForConditionalGeneration,
    processor: LlavaNextProcessor,
    samples: Sequence[Sample],
) -> dict[str, Any]:
    """Accuracy overall and per family (normalized exact match of the first word)."""
    was_training = model.training
    model.eval()
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for sample in samples:
        prediction = normalize_answer(greedy_answer(model, processor, sample))
        total[sample.family] += 1
        correct[sample.family] += int(prediction == sample.answer)
    model.train(was_training)
    return accuracy_report(correct, total)


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


def train(cfg: TrainConfig, out_dir: Path, command: str) -> dict[str, Any]:
    """Train, save, reload, evaluate, write TRAINING.json; return its content."""
    import torch
    import transformers

    from .scenes import make_split

    torch.set_num_threads(cfg.threads)
    start = time.monotonic()
    tokenizer: PreTrainedTokenizerFast = build_tokenizer(SPEC)
    processor = build_processor(SPEC, tokenizer)
    check_tokenization(processor, cfg.seed)
    model = build_model(cfg.seed).train()
    params = sum(p.numel() for p in model.parameters())
    log(start, f"model: {params / 1e6:.2f} M parameters; {cfg.steps} steps of {cfg.batch} chats")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
    )
    eval_samples = make_split("eval", cfg.eval_n, cfg.seed)
    history: list[dict[str, Any]] = []
    smoothed = None
    hits: dict[str, list[int]] = {f: [0, 0] for f in FAMILIES}
    for step in range(cfg.steps):
        batch, _ = make_batch(processor, step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss, counts = answer_loss(model, batch)
        for family, (c, t) in counts.items():
            hits[family][0] += c
            hits[family][1] += t
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        value = loss.item()
        smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
        if step % 25 == 0 or step == cfg.steps - 1:
            first = " ".join(f"{f[:4]} {c / max(1, t):.2f}" for f, (c, t) in hits.items())
            log(start, f"step {step:5d}  loss {value:.4f}  smoothed {smoothed:.4f}  first: {first}")
            hits = {f: [0, 0] for f in FAMILIES}
            history.append({"step": step, "loss": round(value, 4), "smoothed": round(smoothed, 4)})
        if cfg.eval_every and step and step % cfg.eval_every == 0:
            report = evaluate_hf(model, processor, eval_samples[:60])
            log(start, f"eval@{step} (60): {report['accuracy']:.3f} {report['per_family']}")
    train_seconds = time.monotonic() - start

    save_checkpoint(model, processor, out_dir)
    reloaded, reloaded_processor = load_checkpoint(out_dir)
    report = evaluate_hf(reloaded, reloaded_processor, eval_samples)
    log(start, f"eval (HF float32, saved weights, {report['n']}): {report['accuracy']:.4f}")
    log(start, f"per family: {report['per_family']}")
    record = {
        "command": command,
        "seed": cfg.seed,
        "config": cfg.__dict__,
        "spec": SPEC.to_json_dict(),
        "store_dtype": STORE_DTYPE,
        "parameters": params,
        "steps": cfg.steps,
        "train_conversations": cfg.steps * cfg.batch,
        "train_answers": cfg.steps * cfg.batch * (1 + cfg.extra_turns),
        "train_wall_seconds": round(train_seconds, 1),
        "total_wall_seconds": round(time.monotonic() - start, 1),
        "final_train_loss": round(smoothed or float("nan"), 4),
        "loss_history": history,
        "eval_hf_float32": report,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "machine": f"{platform.machine()}, torch threads {torch.get_num_threads()}",
    }
    (out_dir / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


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
    parser.add_argument("--eval-n", type=int, default=defaults.eval_n)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    args = parser.parse_args(argv)
    cfg = TrainConfig(
        seed=args.seed,
        steps=args.steps,
        batch=args.batch,
        extra_turns=args.extra_turns,
        easy_fraction=args.easy_fraction,
        lr=args.lr,
        eval_n=args.eval_n,
        eval_every=args.eval_every,
        threads=args.threads,
    )
    command = shlex.join(
        [Path(sys.executable).name, "-m", "benchmarks.quality.train", *sys.argv[1:]]
    )
    train(cfg, args.out, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
