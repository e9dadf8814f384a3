"""Symbolic grid scenes: the language model's first lessons, before it sees pixels.

Measured on the 8-layer grid model (``train_grid``): a freshly initialised
decoder trained end to end on rendered scenes stayed at the answer prior for
350 chat steps (first-token accuracy on colour 0.20, chance 0.17), although
linear probes read colour and shape from its visual tokens at 98-99%: what it
failed to learn was finding the one token a question is about among ~480.
Fed symbolic visual rows instead, with only the objects a question needs, the
same decoder reached 0.67 first-token answer accuracy in 500 steps of 8 (the
log of that run is cited in ``benchmarks/quality/README.md``), and
``train_grid`` now also supervises where it looks (``evidence``).
This module provides those inputs, laid out exactly as
LLaVA-NeXT packs an image (the 128-px base tile's 64 tokens, then the
high-resolution rows, each followed by the image-newline token), so that the
decoder's later job differs only in where its visual rows come from.

A visual token's symbolic feature is the sum of learned embeddings of what
its cell holds, using ``train_grid.token_labels``' channels (colour, shape,
letter, and colour and shape of its four in-tile neighbours), plus one of four
kinds (background, image newline, base tile, object). The vision stage then
trains the tower and projector to produce these same features from pixels
(``SymbolicFeatures`` is the regression target), and the end-to-end stage
starts from a decoder that already reads them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn as nn

from trio_dev.checkpoints import EOS_TOKEN

from .grid_scenes import _GENERATORS, CELL, FAMILIES, TILE, Scene, Turn, _extra_turns, chat_prompt

#: Token kinds (the ``special`` embedding's rows).
BACKGROUND, NEWLINE, BASE_TILE, OBJECT = range(4)
_SIDE = TILE // CELL  # tokens per tile side
_SALT = "vllm-trio/quality-grid-scenes/symbolic/v1"


class SymbolicFeatures(nn.Module):
    """Learned embedding per label class (class 0, "nothing", is the zero vector)."""

    def __init__(self, hidden: int, channels: Sequence[int], std: float = 0.1) -> None:
        super().__init__()
        self.kinds = nn.Embedding(4, hidden)
        self.tables = nn.ModuleList(nn.Embedding(n, hidden, padding_idx=0) for n in channels)
        for table in (self.kinds, *self.tables):
            nn.init.normal_(table.weight, std=std)
            if table.padding_idx is not None:
                with torch.no_grad():
                    table.weight[table.padding_idx].zero_()

    def forward(self, kinds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Features ``[..., hidden]`` of tokens with ``kinds`` ``[...]`` and ``labels``
        ``[..., channels]`` (-100, unknown, counts as class 0)."""
        out = self.kinds(kinds)
        labels = labels.clamp(min=0)
        for c, table in enumerate(self.tables):
            out = out + table(labels[..., c])
        return out


def ground_in_words(
    features: SymbolicFeatures, embedding: torch.Tensor, words: dict[int, Sequence[int]]
) -> None:
    """Start class ``k + 1`` of channel ``c`` at the embedding row of token
    ``words[c][k]`` (rescaled to the table's standard deviation).

    A visual "red circle" then starts as the sum of the decoder's own vectors for
    "red" and "circle": finding the token a question names becomes matching a
    word with itself, and answering its colour becomes copying it to the output.
    LLaVA's projector is trained to put images into the word-embedding space for
    the same reason. Both tables keep training apart from each other.
    """
    with torch.no_grad():
        for channel, ids in words.items():
            table = features.tables[channel].weight
            std = table[1:].std()
            rows = embedding[list(ids)].to(table)
            table[1 : 1 + len(ids)] = rows / rows.std(dim=-1, keepdim=True) * std


def tile_kinds(labels: torch.Tensor) -> torch.Tensor:
    """Kinds of ``token_labels`` rows ``[tiles, patches, C]``: tile 0 is the base image."""
    kinds = _cell_kinds(labels)
    kinds[0] = BASE_TILE
    return kinds


def _cell_kinds(labels: torch.Tensor) -> torch.Tensor:
    """OBJECT where a token's cell holds an object or a letter, else BACKGROUND."""
    return torch.where((labels[..., 0] > 0) | (labels[..., 2] > 0), OBJECT, BACKGROUND)


def batch_kinds(labels: torch.Tensor) -> torch.Tensor:
    """Kinds of the ``token_labels`` rows of several images at once (concatenated
    ``[tiles, patches, C]``): a base tile is one whose labels are unsupervised
    (-100), which no high-resolution tile's own colour is."""
    return torch.where(labels[..., 0] < 0, BASE_TILE, _cell_kinds(labels))


def packed_layout(scene: Scene, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kinds ``[n]`` and labels ``[n, C]`` of the image's ``n`` visual tokens in
    LLaVA-NeXT's packed order: base tile, then each grid row and a newline."""
    kinds = tile_kinds(labels)
    tiles_x, tiles_y = scene.width // TILE, scene.height // TILE
    channels = labels.shape[-1]

    def grid(t: torch.Tensor, *tail: int) -> torch.Tensor:
        t = t[1:].view(tiles_y, tiles_x, _SIDE, _SIDE, *tail)
        return t.transpose(1, 2).reshape(tiles_y * _SIDE, tiles_x * _SIDE, *tail)

    grid_kinds = torch.cat(
        [grid(kinds), torch.full((tiles_y * _SIDE, 1), NEWLINE, dtype=kinds.dtype)], dim=1
    )
    grid_labels = torch.cat(
        [grid(labels, channels), torch.zeros(tiles_y * _SIDE, 1, channels, dtype=labels.dtype)],
        dim=1,
    )
    return (
        torch.cat([kinds[0], grid_kinds.reshape(-1)]),
        torch.cat([torch.zeros_like(labels[0]), grid_labels.reshape(-1, channels)]),
    )


def symbolic_scene(
    index: int, seed: int, extra_turns: int, max_objects: int | None
) -> tuple[Scene, list[Turn]]:
    """Training scene ``index`` and its turns (own RNG stream: never an eval scene)."""
    rng = random.Random(f"{_SALT}/{seed}/{max_objects}/{index}")
    scene, turn = _GENERATORS[FAMILIES[index % len(FAMILIES)]](rng, max_objects)
    return scene, [turn, *_extra_turns(scene, rng, extra_turns, exclude=turn.question)]


class SymbolicEncoder:
    """Token ids of symbolic chats, with their image placeholders' layout."""

    def __init__(self, tokenizer, image_token_id: int) -> None:
        self._tokenizer = tokenizer
        self._image_token_id = image_token_id

    @lru_cache(maxsize=4096)  # noqa: B019 - a handful of templated strings, one encoder
    def _prompt(self, question: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        ids = self._tokenizer(chat_prompt(question))["input_ids"]
        at = ids.index(self._image_token_id)
        return tuple(ids[:at]), tuple(ids[at + 1 :])

    @lru_cache(maxsize=4096)  # noqa: B019
    def _text(self, text: str) -> tuple[int, ...]:
        return tuple(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(
        self, turns: Sequence[Turn], num_visual: int
    ) -> tuple[list[int], list[int], int, list[int]]:
        """Ids and labels (-100 outside answers) of a chat about an image of
        ``num_visual`` tokens, the index of its first visual row, and the index
        of each answer's first token."""
        before, after = self._prompt(turns[0].question)
        ids = [*before, *[self._image_token_id] * num_visual, *after]
        labels = [-100] * len(ids)
        starts = []
        for i, turn in enumerate(turns):
            if i:
                prompt = self._text(f"USER: {turn.question} ASSISTANT:")
                ids += prompt
                labels += [-100] * len(prompt)
            answer = self._text(f" {turn.answer}{EOS_TOKEN}")
            starts.append(len(ids))
            ids += answer
            labels += answer
        return ids, labels, len(before), starts
