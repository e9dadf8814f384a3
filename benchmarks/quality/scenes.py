"""Seeded generated scenes and one-word questions for measuring what pruning costs.

Random weights cannot show whether pruning keeps answers (DESIGN.md section 4),
so the quality benchmark trains a small LLaVA-NeXT on these scenes and then
asks the same kind of questions with fewer visual tokens. The scenes are built
so that the answer depends on a few *localised* visual tokens: objects are
small (about 2x2 to 3x3 CLIP patches of the high-resolution tiles) on a plain
background, so most visual tokens are background and a pruning method that
drops the wrong few loses the answer.

Design choices, and why:

* Every sample is generated from its own ``random.Random`` seeded by
  ``(split, seed, index)``: ``make_split(s, n)`` is a prefix of
  ``make_split(s, n + 1)``, any sample can be regenerated alone, and the train
  and eval streams are independent. Object positions are continuous, so two
  splits practically never share an image (the tests check by hash).
* Families cycle with the index (``FAMILIES[i % 6]``), so every family is
  equally represented in any split of at least six samples.
* Image sizes cover several aspect ratios, so the LLaVA-NeXT processor picks
  different anyres grids (1x2, 2x1, 2x2, 1x3, 3x1 tiles) and the image-newline
  tokens land in different places.
* Objects sit in the cells of a coarse grid (about 56 px per cell) with some
  jitter, so they never overlap and "left of" / "above" / "top left" are never
  ambiguous.
* yes/no families are balanced, and "no" questions for presence are often
  adversarial (POPE-style): the colour or the shape asked about is in the image,
  just not together.
* Answers are single lower-case words, compared after ``normalize_answer``.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

from PIL import Image, ImageDraw, ImageFont

from trio_dev.checkpoints import DEFAULT_SYSTEM_PROMPT, IMAGE_TOKEN

__all__ = [
    "COLOURS",
    "FAMILIES",
    "IMAGE_SIZES",
    "LABEL_STEP",
    "SHAPES",
    "WORDS",
    "Sample",
    "Style",
    "Turn",
    "chat_prompt",
    "make_conversation",
    "make_sample",
    "make_split",
    "normalize_answer",
]

FAMILIES: tuple[str, ...] = ("colour", "shape", "count", "relation", "presence", "text")

#: Colour name -> RGB. Saturated and far apart, so a tiny vision tower can tell
#: them apart from a couple of patches.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
#: Words rendered in the image for the "text" family (answers, lower-case).
WORDS: tuple[str, ...] = ("cat", "dog", "sun", "car", "box", "map", "cup", "hat")
#: (width, height) of generated images; several aspect ratios on purpose.
IMAGE_SIZES: tuple[tuple[int, int], ...] = (
    (224, 224),
    (256, 192),
    (192, 256),
    (320, 128),
    (128, 320),
    (192, 192),
)
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
QUADRANTS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

_CELL = 56  # target grid-cell size in pixels
#: Label-map value of class index 1 (see ``_Canvas.labels``); 9 classes fit in a byte.
LABEL_STEP = 25
_SPLIT_SALT = "vllm-trio/quality-scenes/v1"


@dataclass(frozen=True)
class Sample:
    """One image with one question and its single-word answer."""

    image: Image.Image
    question: str
    answer: str
    family: str
    #: Per-pixel ground truth for training (``_Canvas.labels``); None for eval samples.
    labels: Image.Image | None = field(default=None, compare=False, repr=False)


def normalize_answer(text: str) -> str:
    """Lower-cased first word of ``text`` with punctuation stripped.

    Generated answers are one word; models may add a full stop, capitalise or
    keep talking, none of which should count against them.
    """
    for word in text.strip().split():
        cleaned = word.strip(string.punctuation + "\"'“”‘’").lower()
        if cleaned:
            return cleaned
    return ""


def chat_prompt(question: str) -> str:
    """The checkpoint's prompt for ``question`` with one ``<image>`` placeholder.

    This is what ``trio_dev.checkpoints.CHAT_TEMPLATE`` renders for one user
    turn (image first, then the text) with a generation prompt, minus the
    leading BOS token: tokenize it *with* special tokens (the default of both
    HF tokenizers/processors and vLLM's text prompts), which adds the single
    BOS. The result is the same token sequence as the chat-template path.
    """
    return f"{DEFAULT_SYSTEM_PROMPT} USER: {IMAGE_TOKEN}\n{question} ASSISTANT:"


def make_split(split: Literal["train", "eval"], n: int, seed: int = 0) -> list[Sample]:
    """The first ``n`` samples of ``split`` (deterministic; train and eval disjoint)."""
    _check_split(split, n)
    return [make_sample(split, i, seed) for i in range(n)]


def make_sample(split: Literal["train", "eval"], index: int, seed: int = 0) -> Sample:
    """Sample ``index`` of ``split``: its own RNG, family ``FAMILIES[index % 6]``."""
    canvas, turn = _generate(split, index, seed)[:2]
    return Sample(canvas.image, turn.question, turn.answer, turn.family)


@dataclass(frozen=True)
class Turn:
    """One question about an image, its single-word answer and its family."""

    question: str
    answer: str
    family: str


@dataclass(frozen=True)
class Style:
    """How scenes look: image sizes and object size relative to a grid cell."""

    sizes: tuple[tuple[int, int], ...] = IMAGE_SIZES
    object_scale: tuple[float, float] = (0.5, 0.7)
    #: At most this many shapes besides those a question needs (None: no limit).
    max_objects: int | None = None

    def cap(self, wanted: int, already: int = 0) -> int:
        """``wanted`` more objects, limited so a scene has at most ``max_objects``.

        Objects a question needs (``already`` placed ones, and at least one)
        are kept; only optional ones are dropped.
        """
        if self.max_objects is None:
            return wanted
        return max(min(wanted, self.max_objects - already), 0 if already else 1)


#: The evaluation (and main training) distribution.
DEFAULT_STYLE = Style()
#: A training warm-up: bigger objects and at most two optional ones per scene.
#: A freshly initialised decoder attends uniformly to all visual tokens; with
#: one or two big objects that average already answers most questions, so the
#: vision tower and projector learn useful features before the decoder has
#: learnt to pick out single objects.
EASY_STYLE = Style(object_scale=(0.7, 0.9), max_objects=2)


def make_conversation(
    split: Literal["train", "eval"],
    index: int,
    seed: int = 0,
    extra_turns: int = 5,
    easy: bool = False,
) -> tuple[Sample, list[Turn]]:
    """Sample ``index`` of ``split`` plus up to ``extra_turns`` more questions about its image.

    Training uses these as multi-turn chats (the sample's own question first,
    exactly as in evaluation, then the extras): the image is encoded once and
    the language model sees it once, but several answers are supervised, which
    multiplies the useful signal per unit of CPU time. The extras are drawn
    from every family whose question is well defined for the scene (for
    instance "What colour is the circle?" only if there is exactly one circle),
    using the same definitions as the single-question generators. The returned
    sample is identical to ``make_sample(split, index, seed)``; with ``easy``
    it is drawn from ``EASY_STYLE`` instead (its own RNG stream, never equal to
    an evaluation sample).
    """
    canvas, turn, rng = _generate(split, index, seed, EASY_STYLE if easy else DEFAULT_STYLE)
    sample = Sample(canvas.image, turn.question, turn.answer, turn.family, canvas.labels)
    return sample, _extra_turns(canvas, rng, extra_turns, exclude=turn.question)


def _check_split(split: str, n: int) -> None:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")


def _generate(
    split: str, index: int, seed: int, style: Style = DEFAULT_STYLE
) -> tuple[_Canvas, Turn, random.Random]:
    _check_split(split, index)
    salt = _SPLIT_SALT if style == DEFAULT_STYLE else f"{_SPLIT_SALT}/{style}"
    rng = random.Random(f"{salt}/{split}/{seed}/{index}")
    family = FAMILIES[index % len(FAMILIES)]
    canvas, turn = _GENERATORS[family](rng, style)
    return canvas, turn, rng


# --------------------------------------------------------------------------- #
# Scene layout and drawing
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class _Obj:
    shape: str
    colour: str
    cx: float
    cy: float
    size: float
    cell: tuple[int, int]


class _Canvas:
    """A background image plus a grid of free cells to place things in."""

    def __init__(self, rng: random.Random, style: Style) -> None:
        self.rng = rng
        self.style = style
        self.width, self.height = rng.choice(style.sizes)
        self.cols = max(2, round(self.width / _CELL))
        self.rows = max(2, round(self.height / _CELL))
        self.cell_w = self.width / self.cols
        self.cell_h = self.height / self.rows
        shade = rng.randint(225, 255)
        tint = tuple(max(0, min(255, shade + rng.randint(-8, 8))) for _ in range(3))
        self.image = Image.new("RGB", (self.width, self.height), tint)
        self.draw = ImageDraw.Draw(self.image)
        # Ground-truth map, same geometry as ``image``: channel 0 = colour index + 1,
        # 1 = shape index + 1, 2 = word index + 1 (0 = background), each times
        # LABEL_STEP. It goes through the image processor with nearest resampling,
        # so training can supervise every visual token (``benchmarks.quality.train``).
        self.labels = Image.new("RGB", (self.width, self.height), (0, 0, 0))
        self.label_draw = ImageDraw.Draw(self.labels)
        self.free: list[tuple[int, int]] = [
            (c, r) for r in range(self.rows) for c in range(self.cols)
        ]
        self.objects: list[_Obj] = []
        self.word: str | None = None
        self.word_cell: tuple[int, int] | None = None

    # Cell geometry ---------------------------------------------------------- #
    def cell_centre(self, cell: tuple[int, int]) -> tuple[float, float]:
        c, r = cell
        return (c + 0.5) * self.cell_w, (r + 0.5) * self.cell_h

    def in_quadrant(self, cell: tuple[int, int], quadrant: str) -> bool:
        """Whether ``cell`` lies clearly (not on the middle line) in ``quadrant``."""
        x, y = self.cell_centre(cell)
        vertical, horizontal = quadrant.split()
        ok_y = y < self.height / 2 - 1 if vertical == "top" else y > self.height / 2 + 1
        ok_x = x < self.width / 2 - 1 if horizontal == "left" else x > self.width / 2 + 1
        return ok_x and ok_y

    def take_cell(
        self, predicate: Callable[[tuple[int, int]], bool] | None = None
    ) -> tuple[int, int]:
        options = [cell for cell in self.free if predicate is None or predicate(cell)]
        if not options:
            raise _Retry
        cell = self.rng.choice(options)
        self.free.remove(cell)
        return cell

    # Drawing ---------------------------------------------------------------- #
    def place(
        self,
        shape: str,
        colour: str,
        predicate: Callable[[tuple[int, int]], bool] | None = None,
    ) -> _Obj:
        cell = self.take_cell(predicate)
        span = min(self.cell_w, self.cell_h)
        size = span * self.rng.uniform(*self.style.object_scale)
        slack = (span - size) / 2 * 0.6
        cx, cy = self.cell_centre(cell)
        cx += self.rng.uniform(-slack, slack)
        cy += self.rng.uniform(-slack, slack)
        obj = _Obj(shape, colour, cx, cy, size, cell)
        _draw_shape(self.draw, obj, COLOURS[colour])
        label = (list(COLOURS).index(colour) + 1, SHAPES.index(shape) + 1, 0)
        _draw_shape(self.label_draw, obj, tuple(v * LABEL_STEP for v in label))
        self.objects.append(obj)
        return obj

    def write(self, word: str) -> None:
        """Render ``word`` in capitals inside one free cell."""
        cell = self.take_cell()
        self.word, self.word_cell = word, cell
        cx, cy = self.cell_centre(cell)
        font = _font(self.rng.choice((16, 18, 20)))
        text = word.upper()
        left, top, right, bottom = self.draw.textbbox((0, 0), text, font=font)
        w, h = right - left, bottom - top
        x = cx - w / 2 - left + self.rng.uniform(-3, 3)
        y = cy - h / 2 - top + self.rng.uniform(-3, 3)
        ink = self.rng.choice(((20, 20, 20), (40, 40, 90), (70, 20, 20)))
        self.draw.text((x, y), text, fill=ink, font=font)
        box = self.draw.textbbox((x, y), text, font=font)
        self.label_draw.rectangle(box, fill=(0, 0, (WORDS.index(word) + 1) * LABEL_STEP))


class _Retry(Exception):
    """Layout did not fit; generate the sample again with the same RNG stream."""


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's bundled font: identical glyphs on every machine, no system fonts.
    return ImageFont.load_default(size=size)


def _draw_shape(draw: ImageDraw.ImageDraw, obj: _Obj, fill: tuple[int, ...]) -> None:
    r = obj.size / 2
    x, y = obj.cx, obj.cy
    if obj.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif obj.shape == "square":
        s = r * 0.85
        draw.rectangle((x - s, y - s, x + s, y + s), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + r * 0.8), (x - r, y + r * 0.8)], fill=fill)
    elif obj.shape == "star":
        points = []
        for k in range(10):
            angle = -math.pi / 2 + k * math.pi / 5
            radius = r if k % 2 == 0 else r * 0.45
            points.append((x + radius * math.cos(angle), y + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(obj.shape)


_Generator = Callable[[random.Random, "Style"], "tuple[_Canvas, Turn]"]


def _retrying(make: _Generator) -> _Generator:
    """Rerun a generator whose layout did not fit (small images have few cells)."""

    def wrapper(rng: random.Random, style: Style) -> tuple[_Canvas, Turn]:
        for _ in range(100):
            try:
                return make(rng, style)
            except _Retry:
                continue
        raise RuntimeError("scene layout failed 100 times")  # pragma: no cover

    return wrapper


def _colours(rng: random.Random, k: int) -> list[str]:
    return rng.sample(list(COLOURS), k)


def _any_colour(rng: random.Random) -> str:
    return rng.choice(list(COLOURS))


# --------------------------------------------------------------------------- #
# Families
# --------------------------------------------------------------------------- #


@_retrying
def _colour_sample(rng: random.Random, style: Style) -> tuple[_Canvas, Turn]:
    """A few objects of distinct shapes; ask the colour of one shape."""
    canvas = _Canvas(rng, style)
    shapes = rng.sample(SHAPES, style.cap(rng.randint(2, 4)))
    for shape in shapes:
        canvas.place(shape, _any_colour(rng))
    target = rng.choice(canvas.objects)
    question = f"What colour is the {target.shape}?"
    return canvas, Turn(question, target.colour, "colour")


@_retrying
def _shape_sample(rng: random.Random, style: Style) -> tuple[_Canvas, Turn]:
    """Ask the shape of the only object of a colour, or in a quadrant."""
    canvas = _Canvas(rng, style)
    count = style.cap(rng.randint(2, 4))
    if rng.random() < 0.5:
        colours = _colours(rng, count)
        for colour in colours:
            canvas.place(rng.choice(SHAPES), colour)
        target = rng.choice(canvas.objects)
        question = f"What shape is the {target.colour} object?"
    else:
        quadrant = rng.choice(QUADRANTS)
        target = canvas.place(
            rng.choice(SHAPES), _any_colour(rng), lambda c: canvas.in_quadrant(c, quadrant)
        )
        for _ in range(count - 1):
            canvas.place(
                rng.choice(SHAPES), _any_colour(rng), lambda c: not canvas.in_quadrant(c, quadrant)
            )
        question = f"What shape is in the {quadrant}?"
    return canvas, Turn(question, target.shape, "shape")


@_retrying
def _count_sample(rng: random.Random, style: Style) -> tuple[_Canvas, Turn]:
    """1-4 copies of one shape (mixed colours) among other shapes; count them."""
    canvas = _Canvas(rng, style)
    shape = rng.choice(SHAPES)
    number = rng.randint(1, 4)
    others = [s for s in SHAPES if s != shape]
    for _ in range(number):
        canvas.place(shape, _any_colour(rng))
    for _ in range(style.cap(rng.randint(0, 2), number)):
        canvas.place(rng.choice(others), _any_colour(rng))
    question = f"How many {shape}s are there?"
    return canvas, Turn(question, COUNT_WORDS[number], "count")


@_retrying
def _relation_sample(rng: random.Random, style: Style) -> tuple[_Canvas, Turn]:
    """Two named objects in different columns/rows; ask a spatial relation (yes/no)."""
    canvas = _Canvas(rng, style)
    relation = rng.choice(RELATIONS)
    horizontal = relation in ("left of", "right of")
    colour_a, colour_b = _colours(rng, 2)
    shape_a, shape_b = rng.choice(SHAPES), rng.choice(SHAPES)
    a_cell = canvas.take_cell()
    axis = 0 if horizontal else 1
    canvas.free.append(a_cell)  # put back; placed through ``place`` below
    a = canvas.place(shape_a, colour_a, lambda c: c == a_cell)
    b = canvas.place(shape_b, colour_b, lambda c: c[axis] != a_cell[axis])
    used = {(colour_a, shape_a), (colour_b, shape_b)}
    for _ in range(style.cap(rng.randint(0, 2), 2)):
        colour, shape = _any_colour(rng), rng.choice(SHAPES)
        if (colour, shape) not in used:
            used.add((colour, shape))
            canvas.place(shape, colour)
    truth = _holds(a, relation, b)
    question = f"Is the {colour_a} {shape_a} {relation} the {colour_b} {shape_b}?"
    return canvas, Turn(question, "yes" if truth else "no", "relation")


def _holds(a: _Obj, relation: str, b: _Obj) -> bool:
    """Whether ``a`` is ``relation`` (one of ``RELATIONS``) ``b``, by centres."""
    return {
        "left of": a.cx < b.cx,
        "right of": a.cx > b.cx,
        "above": a.cy < b.cy,
        "below": a.cy > b.cy,
    }[relation]


@_retrying
def _presence_sample(rng: random.Random, style: Style) -> tuple[_Canvas, Turn]:
    """POPE-style: is there a <colour> <shape>? Half yes, "no" often adversarial."""
    canvas = _Canvas(rng, style)
    colour, shape = _any_colour(rng), rng.choice(SHAPES)
    present = rng.random() < 0.5
    count = style.cap(rng.randint(1, 4))
    if present:
        canvas.place(shape, colour)
        count -= 1
    elif rng.random() < 0.7:
        # Adversarial: the colour or the shape is there, not the pair.
        if rng.random() < 0.5:
            canvas.place(rng.choice([s for s in SHAPES if s != shape]), colour)
        else:
            canvas.place(shape, rng.choice([c for c in COLOURS if c != colour]))
        count -= 1
    for _ in range(max(0, count)):
        while True:
            other = (_any_colour(rng), rng.choice(SHAPES))
            if other != (colour, shape):
                break
        canvas.place(other[1], other[0])
    question = f"Is there a {colour} {shape}?"
    return canvas, Turn(question, "yes" if present else "no", "presence")


@_retrying
def _text_sample(rng: random.Random, style: Style) -> tuple[_Canvas, Turn]:
    """A short word among a few shapes; ask which word is written."""
    canvas = _Canvas(rng, style)
    word = rng.choice(WORDS)
    canvas.write(word)
    for _ in range(style.cap(rng.randint(1, 3))):
        canvas.place(rng.choice(SHAPES), _any_colour(rng))
    return canvas, Turn("What word is written in the image?", word, "text")


_GENERATORS: dict[str, _Generator] = {
    "colour": _colour_sample,
    "shape": _shape_sample,
    "count": _count_sample,
    "relation": _relation_sample,
    "presence": _presence_sample,
    "text": _text_sample,
}


# --------------------------------------------------------------------------- #
# Extra questions about an existing scene (training conversations)
# --------------------------------------------------------------------------- #


def _extra_turns(canvas: _Canvas, rng: random.Random, k: int, exclude: str) -> list[Turn]:
    """Up to ``k`` distinct well-defined questions about ``canvas``, families mixed."""
    pools = _question_pools(canvas, rng)
    for family in pools:
        pools[family] = [t for t in pools[family] if t.question != exclude]
        rng.shuffle(pools[family])
    turns: list[Turn] = []
    while len(turns) < k:
        families = [f for f in FAMILIES if pools.get(f)]
        if not families:
            break
        turns.append(pools[rng.choice(families)].pop())
    return turns


def _question_pools(canvas: _Canvas, rng: random.Random) -> dict[str, list[Turn]]:
    """Every family's valid questions for this scene (yes/no families balanced)."""
    objs = canvas.objects
    by_shape = {s: [o for o in objs if o.shape == s] for s in SHAPES}
    by_colour = {c: [o for o in objs if o.colour == c] for c in COLOURS}
    pools: dict[str, list[Turn]] = {f: [] for f in FAMILIES}

    for shape, found in by_shape.items():
        if len(found) == 1:
            pools["colour"].append(Turn(f"What colour is the {shape}?", found[0].colour, "colour"))
        if 1 <= len(found) < len(COUNT_WORDS):
            pools["count"].append(
                Turn(f"How many {shape}s are there?", COUNT_WORDS[len(found)], "count")
            )
    for colour, found in by_colour.items():
        if len(found) == 1:
            pools["shape"].append(
                Turn(f"What shape is the {colour} object?", found[0].shape, "shape")
            )
    for quadrant in QUADRANTS:
        inside = [o for o in objs if canvas.in_quadrant(o.cell, quadrant)]
        text_inside = canvas.word_cell is not None and canvas.in_quadrant(
            canvas.word_cell, quadrant
        )
        if len(inside) == 1 and not text_inside:
            pools["shape"].append(
                Turn(f"What shape is in the {quadrant}?", inside[0].shape, "shape")
            )

    # Relations between objects that the question names unambiguously.
    pairs = [(o.colour, o.shape) for o in objs]
    named = [o for o in objs if pairs.count((o.colour, o.shape)) == 1]
    relation_turns: dict[str, list[Turn]] = {"yes": [], "no": []}
    for a in named:
        for b in named:
            if a is b or a.colour == b.colour:
                continue
            for relation in RELATIONS:
                axis = 0 if relation in ("left of", "right of") else 1
                if a.cell[axis] == b.cell[axis]:
                    continue
                truth = _holds(a, relation, b)
                question = f"Is the {a.colour} {a.shape} {relation} the {b.colour} {b.shape}?"
                answer = "yes" if truth else "no"
                relation_turns[answer].append(Turn(question, answer, "relation"))
    pools["relation"] = _balanced(relation_turns, rng)

    present = set(pairs)
    presence_turns: dict[str, list[Turn]] = {"yes": [], "no": []}
    for colour in COLOURS:
        for shape in SHAPES:
            answer = "yes" if (colour, shape) in present else "no"
            presence_turns[answer].append(Turn(f"Is there a {colour} {shape}?", answer, "presence"))
    pools["presence"] = _balanced(presence_turns, rng)

    if canvas.word is not None:
        pools["text"].append(Turn("What word is written in the image?", canvas.word, "text"))
    return pools


def _balanced(
    by_answer: dict[str, list[Turn]], rng: random.Random, per_answer: int = 3
) -> list[Turn]:
    """Equally many yes and no questions (up to ``per_answer`` each), so extras stay 50/50."""
    k = min(per_answer, *(len(turns) for turns in by_answer.values()))
    return [turn for turns in by_answer.values() for turn in rng.sample(turns, k)]
