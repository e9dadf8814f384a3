"""Which visual tokens hold the answer to a grid-scene question.

Training uses this to supervise where the language model looks (see
``attention_rows``): a decoder trained from scratch on these scenes found the
tokens a question is about only slowly, and supervising one layer's attention
at the answer position onto these tokens is what taught it (the numbers are in
``benchmarks/quality/README.md``). The cells follow the families' definitions in
``grid_scenes``: the evidence is the objects the question names, so that an
attention map that covers them lets every family be answered.
"""

from __future__ import annotations

import re

from .grid_scenes import CELL, COLOURS, FAMILIES, RELATIONS, SHAPES, TILE, Scene, Turn

_BASE_TOKENS = (TILE // CELL) ** 2  # the base tile's tokens come first in the packed order

#: The count family's plurals, spelt as ``grid_scenes`` asks them (``f"{shape}s"``).
_PLURALS = {f"{shape}s": shape for shape in SHAPES}

_PATTERNS: dict[str, re.Pattern[str]] = {
    "colour": re.compile(r"What colour is the (?P<shape>\w+)\?"),
    "shape": re.compile(r"What shape is the (?P<colour>\w+) object\?"),
    "count": re.compile(r"How many (?P<plural>\w+) are there\?"),
    "relation": re.compile(
        r"What shape is (?P<side>left of|right of|above|below) the (?P<colour>\w+) (?P<shape>\w+)\?"
    ),
    "presence": re.compile(r"Is there a (?P<colour>\w+) (?P<shape>\w+)\?"),
    "text": re.compile(r"What letter is written in the image\?"),
}


#: ``question_keys`` channels: (name, classes); class 0 is "the question names none".
QUERY_CHANNELS: tuple[tuple[str, int], ...] = (
    ("colour", len(COLOURS) + 1),
    ("shape", len(SHAPES) + 1),
    ("side", len(RELATIONS) + 1),
    ("family", len(FAMILIES)),
)


def question_keys(turn: Turn) -> tuple[int, int, int, int]:
    """What ``turn`` asks about, as ``QUERY_CHANNELS`` classes: the colour and the
    shape it names, the side of a relation, and its family.

    Training asks the answer position to carry these by the layer whose attention
    is supervised: the lookup's query is built from them, and a decoder that
    had learned where to look for colour questions still did not carry the
    colour a shape question names to the answer position (a probe read it 41%).
    """
    match = _PATTERNS[turn.family].fullmatch(turn.question)
    if match is None:
        raise ValueError(f"not a {turn.family} question of grid_scenes: {turn.question!r}")
    g = match.groupdict()
    shape = _PLURALS.get(g["plural"]) if "plural" in g else g.get("shape")
    return (
        list(COLOURS).index(g["colour"]) + 1 if "colour" in g else 0,
        SHAPES.index(shape) + 1 if shape else 0,
        list(RELATIONS).index(g["side"]) + 1 if "side" in g else 0,
        FAMILIES.index(turn.family),
    )


def evidence_cells(scene: Scene, turn: Turn) -> list[tuple[int, int]]:
    """Cells ``(column, row)`` whose tokens a correct answer to ``turn`` reads.

    colour/shape: the one object of the named shape/colour; count: every object
    of the shape (1-4); relation: the named object, whose token carries its
    in-tile neighbours (reading the neighbour's own token instead would need
    the lookup to match a neighbour, not the token itself); presence: the named
    object(s) if present, else the objects sharing its colour or shape (POPE-style
    "no" scenes), possibly none; text: the letter.
    """
    match = _PATTERNS[turn.family].fullmatch(turn.question)
    if match is None:
        raise ValueError(f"not a {turn.family} question of grid_scenes: {turn.question!r}")
    objects = scene.objects()
    f, g = turn.family, match.groupdict()
    if f == "colour":
        return [c for c, t in objects if t.shape == g["shape"]]
    if f == "shape":
        return [c for c, t in objects if t.colour == g["colour"]]
    if f == "count":
        shape = _PLURALS.get(g["plural"])
        if shape is None:
            raise ValueError(f"not a count question of grid_scenes: {turn.question!r}")
        return [c for c, t in objects if t.shape == shape]
    if f == "relation":
        return [c for c, t in objects if (t.colour, t.shape) == (g["colour"], g["shape"])]
    if f == "presence":
        exact = [c for c, t in objects if (t.colour, t.shape) == (g["colour"], g["shape"])]
        return exact or [c for c, t in objects if t.colour == g["colour"] or t.shape == g["shape"]]
    return [c for c, t in scene.cells.items() if t.kind == "letter"]


def packed_index(scene: Scene, cell: tuple[int, int]) -> int:
    """Index of ``cell``'s token among the image's packed visual tokens (LLaVA-NeXT
    order: the base tile, then each high-resolution row and its newline token)."""
    column, row = cell
    return _BASE_TOKENS + row * (scene.cols + 1) + column


def evidence_tokens(scene: Scene, turn: Turn) -> list[int]:
    """Packed visual-token indices (``packed_index``) of ``evidence_cells``."""
    return [packed_index(scene, cell) for cell in evidence_cells(scene, turn)]
