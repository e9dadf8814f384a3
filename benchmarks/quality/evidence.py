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

from .grid_scenes import CELL, SHAPES, TILE, Scene, Turn

_BASE_TOKENS = (TILE // CELL) ** 2  # the base tile's tokens come first in the packed order

#: The count family's plurals, spelt as ``grid_scenes`` asks them (``f"{shape}s"``).
_PLURALS = {f"{shape}s": shape for shape in SHAPES}

_PATTERNS: dict[str, re.Pattern[str]] = {
    "colour": re.compile(r"What colour is the (?P<shape>\w+)\?"),
    "shape": re.compile(r"What shape is the (?P<colour>\w+) object\?"),
    "count": re.compile(r"How many (?P<plural>\w+) are there\?"),
    "relation": re.compile(
        r"Is the (?P<c1>\w+) (?P<s1>\w+) (?:left of|right of|above|below) "
        r"the (?P<c2>\w+) (?P<s2>\w+)\?"
    ),
    "presence": re.compile(r"Is there a (?P<colour>\w+) (?P<shape>\w+)\?"),
    "text": re.compile(r"What letter is written in the image\?"),
}


def evidence_cells(scene: Scene, turn: Turn) -> list[tuple[int, int]]:
    """Cells ``(column, row)`` whose tokens a correct answer to ``turn`` reads.

    colour/shape: the one object of the named shape/colour; count: every object
    of the shape (1-4); relation: the two named objects; presence: the named
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
        named = {(g["c1"], g["s1"]), (g["c2"], g["s2"])}
        return [c for c, t in objects if (t.colour, t.shape) in named]
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
