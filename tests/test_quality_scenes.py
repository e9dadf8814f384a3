"""The generated-scene data set and the checkpoint trained on it (issue 3, part A).

The quality benchmark is only as good as its data and its model: the splits
must be reproducible and disjoint, every task family must be there, answers
must be single normalized words, images must vary in size (so LLaVA-NeXT's
anyres grids vary), and the shipped checkpoint must load cleanly and actually
answer the questions.
"""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # ``benchmarks`` is a top-level package, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks.quality import scenes  # noqa: E402
from benchmarks.quality.scenes import (  # noqa: E402
    FAMILIES,
    chat_prompt,
    make_conversation,
    make_sample,
    make_split,
    normalize_answer,
)

MODEL_DIR = ROOT / "benchmarks" / "quality" / "model"


def _image_hash(sample: scenes.Sample) -> str:
    return hashlib.sha256(sample.image.tobytes() + repr(sample.image.size).encode()).hexdigest()


def test_make_split_is_deterministic() -> None:
    first = make_split("eval", 24, seed=0)
    second = make_split("eval", 24, seed=0)
    assert [_image_hash(s) for s in first] == [_image_hash(s) for s in second]
    assert [(s.question, s.answer, s.family) for s in first] == [
        (s.question, s.answer, s.family) for s in second
    ]
    # A split is a prefix of a longer one, and a sample can be regenerated alone.
    longer = make_split("eval", 30, seed=0)
    assert [_image_hash(s) for s in longer[:24]] == [_image_hash(s) for s in first]
    assert _image_hash(make_sample("eval", 7)) == _image_hash(first[7])
    # Another seed gives other scenes.
    other = make_split("eval", 24, seed=1)
    assert {_image_hash(s) for s in other}.isdisjoint(_image_hash(s) for s in first)


def test_train_and_eval_are_disjoint() -> None:
    train = make_split("train", 600)
    evaluation = make_split("eval", 300)
    train_hashes = {_image_hash(s) for s in train}
    assert len(train_hashes) == len(train)
    assert not train_hashes & {_image_hash(s) for s in evaluation}


def test_families_answers_and_sizes() -> None:
    samples = make_split("eval", 120)
    assert set(FAMILIES) == {
        "colour",
        "shape",
        "count",
        "relation",
        "presence",
        "text",
    }
    counts = Counter(s.family for s in samples)
    assert counts == dict.fromkeys(FAMILIES, 20)  # families cycle with the index
    for sample in samples:
        assert sample.answer == normalize_answer(sample.answer)
        assert sample.answer.isalpha() and " " not in sample.answer
        assert sample.question.endswith("?")
    for family in ("relation", "presence"):
        answers = Counter(s.answer for s in samples if s.family == family)
        assert set(answers) == {"yes", "no"}, family
    assert len({s.image.size for s in samples}) >= 4
    assert len({w / h for w, h in (s.image.size for s in samples)}) >= 3
    # Objects are small: most pixels are background.
    for sample in samples[:12]:
        colours = sample.image.getcolors(maxcolors=1 << 16)
        assert colours is not None
        assert max(count for count, _ in colours) > 0.6 * sample.image.width * sample.image.height


def test_normalize_answer() -> None:
    assert normalize_answer(" Red.") == "red"
    assert normalize_answer("YES, it is") == "yes"
    assert normalize_answer('"cat"') == "cat"
    assert normalize_answer("... two") == "two"
    assert normalize_answer("") == ""


def test_chat_prompt_matches_the_chat_template() -> None:
    from vllm_trio.checkpoints import CHAT_TEMPLATE, DEFAULT_SYSTEM_PROMPT

    jinja2 = pytest.importorskip("jinja2")
    prompt = chat_prompt("What colour is the star?")
    assert prompt.count("<image>") == 1
    assert prompt.startswith(DEFAULT_SYSTEM_PROMPT)
    assert prompt.endswith("What colour is the star? ASSISTANT:")
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What colour is the star?"}],
        }
    ]
    rendered = (
        jinja2.Environment()
        .from_string(CHAT_TEMPLATE)
        .render(messages=messages, bos_token="<s>", eos_token="</s>", add_generation_prompt=True)
    )
    assert rendered == "<s>" + prompt  # BOS comes from the tokenizer, not the string


def test_conversations_start_with_the_split_sample() -> None:
    for index in range(12):
        sample, extra = make_conversation("train", index, extra_turns=5)
        alone = make_sample("train", index)
        assert (sample.question, sample.answer) == (alone.question, alone.answer)
        assert _image_hash(sample) == _image_hash(alone)
        assert extra, index
        assert sample.question not in {t.question for t in extra}
        for turn in extra:
            assert turn.family in FAMILIES
            assert turn.answer == normalize_answer(turn.answer)


@pytest.mark.skipif(
    not (MODEL_DIR / "TRAINING.json").is_file(), reason="checkpoint not trained yet"
)
def test_shipped_checkpoint_answers_eval_questions() -> None:
    """HF loads the shipped checkpoint with no missing keys and answers >= 80% of 30."""
    import torch

    from benchmarks.quality.train import greedy_answer, load_checkpoint

    torch.set_num_threads(1)
    model, processor = load_checkpoint(MODEL_DIR)  # raises on missing/unexpected keys
    samples = make_split("eval", 30)
    correct = sum(normalize_answer(greedy_answer(model, processor, s)) == s.answer for s in samples)
    assert correct >= 24, f"{correct}/30 correct"
