"""Seeded grid scenes and one-word questions for measuring what pruning costs (v2).

The first scene set (``scenes.py``) drew objects at free positions about two
CLIP patches wide; every patch saw a fragment of an outline, and the trained
model's visual tokens carried colour (a linear probe reads it 100% on held-out
tokens) but hardly shape (37%, the majority class is 30%) or words (21%), so
its language model could not tell which colour belongs to which shape and
stopped at 40.7% (see ``benchmarks/quality/README.md``). Here every object
fills exactly one CLIP patch of the high-resolution tiles:

* Image sizes are LLaVA-NeXT pinpoints (``IMAGE_SIZES``), so the processor
  tiles them without resizing or padding, and the scene's 16-px cells are
  exactly the tower's patches. One token then sees one whole object (or one
  letter), and what the language model needs for an answer sits in one or two
  of the 336-664 visual tokens of an image (2x2, 3x2, 2x3, 3x3 tiles of 128 px
  plus the 128-px base image): exactly what a pruning method must not drop.
* ``Scene.cells`` records what is drawn on every cell, so training can label
  every visual token directly (``benchmarks.quality.train_grid``).
* Families (``FAMILIES``) cycle with the index; within a family the answer is
  drawn first and uniformly, then a scene is built around it, so answering from
  the question alone scores chance: 1/6 colour, 1/4 shape, count and
  relation, 1/2 presence, 1/8 text.
* Relations are between two objects in neighbouring cells of one tile ("What
  shape is left of the red circle?"): the evidence is the named object's token
  (whose in-tile neighbours the tower encodes) and its neighbour's.
* Presence "no" questions are mostly adversarial (POPE-style): the colour or
  the shape asked about is in the image, just not together.
* Every sample has its own ``random.Random`` seeded by (split, seed, index):
  splits are prefixes of longer ones and train and eval are independent.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from PIL import Image, ImageDraw, ImageFont

from trio_dev.checkpoints import DEFAULT_SYSTEM_PROMPT, IMAGE_TOKEN

__all__ = [
    "CELL",
    "COLOURS",
    "COUNT_WORDS",
    "FAMILIES",
    "IMAGE_SIZES",
    "LETTERS",
    "RELATIONS",
    "SHAPES",
    "TILE",
    "Sample",
    "Scene",
    "Turn",
    "chat_prompt",
    "make_conversation",
    "make_sample",
    "make_split",
    "normalize_answer",
    "tile_neighbours",
    "vocabulary_text",
]

FAMILIES: tuple[str, ...] = ("colour", "shape", "count", "relation", "presence", "text")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
#: Letters drawn (in capitals) for the "text" family; answers are lower-case.
LETTERS: tuple[str, ...] = ("a", "e", "h", "k", "m", "r", "t", "x")
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
#: Relation -> (dx, dy) from the first object to the second when it holds.
RELATIONS: dict[str, tuple[int, int]] = {
    "left of": (1, 0),
    "right of": (-1, 0),
    "above": (0, 1),
    "below": (0, -1),
}
#: CLIP patch size and tile size of the model trained on these scenes.
CELL = 16
TILE = 128
#: (width, height); all are pinpoints of that model, so no resize and no padding.
IMAGE_SIZES: tuple[tuple[int, int], ...] = ((256, 256), (384, 256), (256, 384), (384, 384))
_SPLIT_SALT = "vllm-trio/quality-grid-scenes/v1"


@dataclass(frozen=True)
class Thing:
    """What is drawn on one cell: an object (colour and shape) or a letter."""

    kind: Literal["object", "letter"]
    colour: str = ""
    shape: str = ""
    letter: str = ""


@dataclass
class Scene:
    """A grid of ``CELL``-px cells, some holding a ``Thing``."""

    width: int
    height: int
    cells: dict[tuple[int, int], Thing]

    @property
    def cols(self) -> int:
        return self.width // CELL

    @property
    def rows(self) -> int:
        return self.height // CELL

    def objects(self) -> list[tuple[tuple[int, int], Thing]]:
        return [(cell, t) for cell, t in self.cells.items() if t.kind == "object"]


@dataclass(frozen=True)
class Turn:
    """One question about an image, its single-word answer and its family."""

    question: str
    answer: str
    family: str


@dataclass(frozen=True)
class Sample:
    """One image with one question and its single-word answer."""

    image: Image.Image
    question: str
    answer: str
    family: str
    scene: Scene | None = None


def normalize_answer(text: str) -> str:
    """Lower-cased first word of ``text`` with punctuation stripped."""
    for word in text.strip().split():
        cleaned = word.strip(string.punctuation + "\"'“”‘’").lower()
        if cleaned:
            return cleaned
    return ""


def chat_prompt(question: str) -> str:
    """The checkpoint's prompt for ``question`` (the chat template's rendering minus BOS)."""
    return f"{DEFAULT_SYSTEM_PROMPT} USER: {IMAGE_TOKEN}\n{question} ASSISTANT:"


def make_split(split: Literal["train", "eval"], n: int, seed: int = 0) -> list[Sample]:
    """The first ``n`` samples of ``split`` (deterministic; train and eval disjoint)."""
    _check_split(split, n)
    return [make_sample(split, i, seed) for i in range(n)]


def make_sample(split: Literal["train", "eval"], index: int, seed: int = 0) -> Sample:
    """Sample ``index`` of ``split``: family ``FAMILIES[index % 6]``, its own RNG."""
    return make_conversation(split, index, seed, 0)[0]


def make_conversation(
    split: Literal["train", "eval"],
    index: int,
    seed: int = 0,
    extra_turns: int = 5,
    max_objects: int | None = None,
) -> tuple[Sample, list[Turn]]:
    """Sample ``index`` plus up to ``extra_turns`` more well-defined questions about its image.

    With ``max_objects`` (a training curriculum) scenes hold at most that many
    objects besides the ones the question needs; such scenes come from their
    own RNG stream, so they never equal an evaluation scene.
    """
    _check_split(split, index)
    salt = _SPLIT_SALT if max_objects is None else f"{_SPLIT_SALT}/max{max_objects}"
    rng = random.Random(f"{salt}/{split}/{seed}/{index}")
    family = FAMILIES[index % len(FAMILIES)]
    scene, turn = _GENERATORS[family](rng, max_objects)
    image = render(scene, rng)
    extra = _extra_turns(scene, rng, extra_turns, exclude=turn.question)
    return Sample(image, turn.question, turn.answer, turn.family, scene), extra


def vocabulary_text() -> list[str]:
    """Every question and answer form, for training a tokenizer that keeps them whole."""
    lines = [f"What colour is the {s}? {c}" for s in SHAPES for c in COLOURS]
    lines += [f"What shape is the {c} object? {s}" for c in COLOURS for s in SHAPES]
    lines += [f"How many {s}s are there? {w}" for s in SHAPES for w in COUNT_WORDS]
    lines += [
        f"Is the {c} {s} {r} the {c} {s}? yes no"
        for c in COLOURS
        for s in SHAPES
        for r in RELATIONS
    ]
    lines += [f"Is there a {c} {s}? yes no" for c in COLOURS for s in SHAPES]
    lines += [f"What letter is written in the image? {x}" for x in LETTERS]
    return lines


def _check_split(split: str, n: int) -> None:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")


# --------------------------------------------------------------------------- #
# Layout and drawing
# --------------------------------------------------------------------------- #


class _Layout:
    """A scene under construction: free cells, placed things."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        width, height = rng.choice(IMAGE_SIZES)
        self.scene = Scene(width, height, {})

    def free(self) -> list[tuple[int, int]]:
        s = self.scene
        return [(c, r) for r in range(s.rows) for c in range(s.cols) if (c, r) not in s.cells]

    def put(self, thing: Thing, cell: tuple[int, int] | None = None) -> tuple[int, int]:
        if cell is None:
            cell = self.rng.choice(self.free())
        if cell in self.scene.cells:
            raise ValueError(f"cell {cell} is taken")
        self.scene.cells[cell] = thing
        return cell

    def fill(self, n: int, allowed: Callable[[Thing], bool]) -> None:
        """``n`` random objects that satisfy ``allowed`` (the question's constraints)."""
        for _ in range(n):
            for _ in range(100):
                thing = Thing("object", self.rng.choice(list(COLOURS)), self.rng.choice(SHAPES))
                if allowed(thing):
                    self.put(thing)
                    break

    def extra(self, low: int, high: int, max_objects: int | None) -> int:
        n = self.rng.randint(low, high)
        return n if max_objects is None else min(n, max_objects)


def render(scene: Scene, rng: random.Random) -> Image.Image:
    """Draw ``scene``: a plain light background and one thing per occupied cell."""
    shade = rng.randint(225, 250)
    tint = tuple(max(0, min(255, shade + rng.randint(-6, 6))) for _ in range(3))
    image = Image.new("RGB", (scene.width, scene.height), tint)
    draw = ImageDraw.Draw(image)
    for (c, r), thing in sorted(scene.cells.items()):
        x0, y0 = c * CELL, r * CELL
        if thing.kind == "letter":
            _draw_letter(draw, thing.letter, x0, y0)
        else:
            _draw_shape(draw, thing.shape, COLOURS[thing.colour], x0, y0)
    return image


@lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's bundled font: identical glyphs on every machine.
    return ImageFont.load_default(size=15)


def _draw_letter(draw: ImageDraw.ImageDraw, letter: str, x0: int, y0: int) -> None:
    text = letter.upper()
    left, top, right, bottom = draw.textbbox((0, 0), text, font=_font())
    x = x0 + (CELL - (right - left)) / 2 - left
    y = y0 + (CELL - (bottom - top)) / 2 - top
    draw.text((x, y), text, fill=(20, 20, 20), font=_font())


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, fill: tuple[int, int, int], x0: int, y0: int
) -> None:
    a, b = x0 + 2, y0 + 2
    e = CELL - 5  # 12-px objects, 2 px from the cell's edges
    if shape == "circle":
        draw.ellipse((a, b, a + e, b + e), fill=fill)
    elif shape == "square":
        draw.rectangle((a + 1, b + 1, a + e - 1, b + e - 1), fill=fill)
    elif shape == "triangle":
        draw.polygon([(a + e / 2, b), (a + e, b + e), (a, b + e)], fill=fill)
    elif shape == "cross":
        t = 2
        draw.rectangle((a + e / 2 - t, b, a + e / 2 + t, b + e), fill=fill)
        draw.rectangle((a, b + e / 2 - t, a + e, b + e / 2 + t), fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(shape)


# --------------------------------------------------------------------------- #
# Families: answer first (uniform), then a scene around it
# --------------------------------------------------------------------------- #


def _colour(rng: random.Random, max_objects: int | None) -> tuple[Scene, Turn]:
    """The only <shape> has the answer's colour; other objects have other shapes."""
    lay = _Layout(rng)
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    lay.put(Thing("object", colour, shape))
    lay.fill(lay.extra(2, 7, max_objects), lambda t: t.shape != shape)
    return lay.scene, Turn(f"What colour is the {shape}?", colour, "colour")


def _shape(rng: random.Random, max_objects: int | None) -> tuple[Scene, Turn]:
    """The only <colour> object has the answer's shape."""
    lay = _Layout(rng)
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    lay.put(Thing("object", colour, shape))
    lay.fill(lay.extra(2, 7, max_objects), lambda t: t.colour != colour)
    return lay.scene, Turn(f"What shape is the {colour} object?", shape, "shape")


def _count(rng: random.Random, max_objects: int | None) -> tuple[Scene, Turn]:
    """1-4 <shape>s of any colours among objects of other shapes."""
    lay = _Layout(rng)
    shape, number = rng.choice(SHAPES), rng.randint(1, 4)
    lay.fill(number, lambda t: t.shape == shape)
    lay.fill(lay.extra(1, 5, max_objects), lambda t: t.shape != shape)
    return lay.scene, Turn(f"How many {shape}s are there?", COUNT_WORDS[number], "count")


def _relation(rng: random.Random, max_objects: int | None) -> tuple[Scene, Turn]:
    """The shape of the object on one side of a named object, inside its tile.

    Often another object sits on another side of the named one, with another
    shape, so the side matters. (A yes/no form, "Is the red circle left of the
    blue square?", stayed at chance through 1,000 steps of its own training
    block: its answer needs the second object matched against the first one's
    neighbour on the asked side inside one attention lookup. Here the lookup is
    the named object, as for colour and presence, and the side selects what to
    read from it.)
    """
    lay = _Layout(rng)
    relation, answer = rng.choice(list(RELATIONS)), rng.choice(SHAPES)
    anchor = Thing("object", *_pair(rng))
    dx, dy = RELATIONS[relation]
    # "<object> <relation> <anchor>": the anchor is the object's neighbour (dx, dy).
    cell_x, cell_a = _neighbours(lay, rng, dx, dy)
    colour = rng.choice([c for c in COLOURS if (c, answer) != (anchor.colour, anchor.shape)])
    lay.put(Thing("object", colour, answer), cell_x)
    lay.put(anchor, cell_a)
    if rng.random() < 0.75:
        others = [
            cell
            for cell in tile_neighbours(lay.scene, cell_a)
            if cell != cell_x and cell not in lay.scene.cells
        ]
        if others:
            while True:
                other = Thing("object", *_pair(rng))
                if other.shape != answer and other != anchor:
                    break
            lay.put(other, rng.choice(others))
    pair = (anchor.colour, anchor.shape)
    lay.fill(lay.extra(1, 5, max_objects), lambda t: (t.colour, t.shape) != pair)
    question = f"What shape is {relation} the {anchor.colour} {anchor.shape}?"
    return lay.scene, Turn(question, answer, "relation")


def tile_neighbours(scene: Scene, cell: tuple[int, int]) -> list[tuple[int, int]]:
    """The cells next to ``cell`` (left, right, above, below) inside its tile."""
    per_tile = TILE // CELL
    c, r = cell
    return [
        (c + dx, r + dy)
        for dx, dy in RELATIONS.values()
        if 0 <= c + dx < scene.cols
        and 0 <= r + dy < scene.rows
        and (c + dx) // per_tile == c // per_tile
        and (r + dy) // per_tile == r // per_tile
    ]


def _pair(rng: random.Random) -> tuple[str, str]:
    return rng.choice(list(COLOURS)), rng.choice(SHAPES)


def _neighbours(
    lay: _Layout, rng: random.Random, dx: int, dy: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Two free cells ``(c, r)`` and ``(c + dx, r + dy)`` inside one tile."""
    per_tile = TILE // CELL
    options = [
        (c, r)
        for c, r in lay.free()
        if (c + dx, r + dy) not in lay.scene.cells
        and 0 <= c + dx < lay.scene.cols
        and 0 <= r + dy < lay.scene.rows
        and (c + dx) // per_tile == c // per_tile
        and (r + dy) // per_tile == r // per_tile
    ]
    c, r = rng.choice(options)
    return (c, r), (c + dx, r + dy)


def _presence(rng: random.Random, max_objects: int | None) -> tuple[Scene, Turn]:
    """Is there a <colour> <shape>? Half yes; "no" mostly adversarial."""
    lay = _Layout(rng)
    colour, shape = _pair(rng)
    present = rng.random() < 0.5
    if present:
        lay.put(Thing("object", colour, shape))
    elif rng.random() < 0.8:
        if rng.random() < 0.5:
            lay.put(Thing("object", colour, rng.choice([s for s in SHAPES if s != shape])))
        else:
            lay.put(Thing("object", rng.choice([c for c in COLOURS if c != colour]), shape))
    lay.fill(lay.extra(1, 6, max_objects), lambda t: (t.colour, t.shape) != (colour, shape))
    return lay.scene, Turn(f"Is there a {colour} {shape}?", "yes" if present else "no", "presence")


def _text(rng: random.Random, max_objects: int | None) -> tuple[Scene, Turn]:
    """One letter among a few objects."""
    lay = _Layout(rng)
    letter = rng.choice(LETTERS)
    lay.put(Thing("letter", letter=letter))
    lay.fill(lay.extra(2, 7, max_objects), lambda t: True)
    return lay.scene, Turn("What letter is written in the image?", letter, "text")


_GENERATORS: dict[str, Callable[[random.Random, int | None], tuple[Scene, Turn]]] = {
    "colour": _colour,
    "shape": _shape,
    "count": _count,
    "relation": _relation,
    "presence": _presence,
    "text": _text,
}


# --------------------------------------------------------------------------- #
# Extra questions about a scene (training conversations)
# --------------------------------------------------------------------------- #


def _extra_turns(scene: Scene, rng: random.Random, k: int, exclude: str) -> list[Turn]:
    """Up to ``k`` distinct well-defined questions about ``scene``, families mixed."""
    if k <= 0:
        return []
    pools = _question_pools(scene, rng)
    for family in pools:
        pools[family] = [t for t in pools[family] if t.question != exclude]
        rng.shuffle(pools[family])
    turns: list[Turn] = []
    while len(turns) < k:
        families = [f for f in FAMILIES if pools[f]]
        if not families:
            break
        turns.append(pools[rng.choice(families)].pop())
    return turns


def _question_pools(scene: Scene, rng: random.Random) -> dict[str, list[Turn]]:
    """Every family's valid questions for ``scene`` (yes/no families balanced)."""
    objs = scene.objects()
    pools: dict[str, list[Turn]] = {f: [] for f in FAMILIES}
    for shape in SHAPES:
        found = [t for _, t in objs if t.shape == shape]
        if len(found) == 1:
            pools["colour"].append(Turn(f"What colour is the {shape}?", found[0].colour, "colour"))
        if 1 <= len(found) <= 4:
            pools["count"].append(
                Turn(f"How many {shape}s are there?", COUNT_WORDS[len(found)], "count")
            )
    for colour in COLOURS:
        found = [t for _, t in objs if t.colour == colour]
        if len(found) == 1:
            pools["shape"].append(
                Turn(f"What shape is the {colour} object?", found[0].shape, "shape")
            )
    pairs = [(t.colour, t.shape) for _, t in objs]
    for cell, anchor in objs:
        if pairs.count((anchor.colour, anchor.shape)) != 1:
            continue
        for relation, (dx, dy) in RELATIONS.items():
            x_cell = (cell[0] - dx, cell[1] - dy)
            x = scene.cells.get(x_cell)
            if x is None or x.kind != "object" or x_cell not in tile_neighbours(scene, cell):
                continue
            question = f"What shape is {relation} the {anchor.colour} {anchor.shape}?"
            pools["relation"].append(Turn(question, x.shape, "relation"))
    present = set(pairs)
    by_answer = {"yes": [], "no": []}
    for colour in COLOURS:
        for shape in SHAPES:
            answer = "yes" if (colour, shape) in present else "no"
            by_answer[answer].append(Turn(f"Is there a {colour} {shape}?", answer, "presence"))
    pools["presence"] = _balanced(by_answer, rng)
    for thing in scene.cells.values():
        if thing.kind == "letter":
            pools["text"].append(Turn("What letter is written in the image?", thing.letter, "text"))
    return pools


def _balanced(
    by_answer: dict[str, list[Turn]], rng: random.Random, per_answer: int = 3
) -> list[Turn]:
    """Equally many yes and no questions (up to ``per_answer`` each)."""
    k = min(per_answer, *(len(turns) for turns in by_answer.values()))
    return [turn for turns in by_answer.values() for turn in rng.sample(turns, k)]
