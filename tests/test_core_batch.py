"""One batched side pass over several prompts equals the prompts scored one at a time.

Random Llama weights (MHA and GQA), float32: a right-padded batch of prompts of
different lengths, some shorter than the loss window, runs layer 0 forward and
TRIO's selection at layer 1 once; each prompt's states, saliency and kept
indices must be its solo ones (kept indices exactly). The tensor-parallel
version is in ``test_core_tensor_parallel.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from random_llama import random_layer_weights, rotary_table

from vllm_trio.core import (
    TrioParams,
    decoder_layer,
    pad_rows,
    plan_batches,
    rms_norm,
    select_visual_tokens,
    select_visual_tokens_batch,
)

DIM, HEAD_DIM, INTER, VOCAB = 64, 8, 96, 50
#: (prompt length, first visual row, visual rows, k): a 3-row prompt has fewer
#: loss rows than the others (its loss window is clamped at row 0).
PROMPTS = [(40, 6, 24, 6), (17, 2, 12, 3), (61, 10, 45, 11), (3, 0, 2, 1), (33, 5, 20, 5)]


def _model(heads: int, kv_heads: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    shape = dict(dim=DIM, heads=heads, kv_heads=kv_heads, head_dim=HEAD_DIM, inter=INTER)
    return {
        "layers": [random_layer_weights(gen, **shape, scale=0.3) for _ in range(2)],
        "rotary": rotary_table(HEAD_DIM, 128),
        "norm": 1 + torch.randn(DIM, generator=gen) * 0.1,
        "head": torch.randn(VOCAB, DIM, generator=gen) * 0.5,
        "embeds": [torch.randn(n, DIM, generator=gen) for n, *_ in PROMPTS],
    }


def _norm_head(model: dict):
    return (
        lambda h: rms_norm(h, model["norm"], 1e-5),
        lambda h: F.linear(h, model["head"]),
    )


def _visual(first: int, count: int) -> torch.Tensor:
    return torch.arange(first, first + count)


def solo(model: dict, b: int):
    """Prompt ``b`` alone, the way the side pass runs one image."""
    n, first, count, k = PROMPTS[b]
    pos = torch.arange(n)
    layers, rotary = model["layers"], model["rotary"]
    with torch.no_grad():
        hidden = decoder_layer(model["embeds"][b], layers[0], rotary, pos)
    sel = select_visual_tokens(
        hidden,
        _visual(first, count),
        k,
        lambda h, qi: decoder_layer(h, layers[1], rotary, pos, qi),
        *_norm_head(model),
        TrioParams(),
    )
    return hidden, sel


def batched(model: dict):
    """Every prompt in one right-padded batch."""
    lengths = [n for n, *_ in PROMPTS]
    pos = pad_rows([torch.arange(n) for n in lengths])
    layers, rotary = model["layers"], model["rotary"]
    with torch.no_grad():
        hidden = decoder_layer(pad_rows(model["embeds"]), layers[0], rotary, pos)
    sels = select_visual_tokens_batch(
        hidden,
        lengths,
        [_visual(first, count) for _, first, count, _ in PROMPTS],
        [k for *_, k in PROMPTS],
        lambda h, qi: decoder_layer(h, layers[1], rotary, pos, qi),
        *_norm_head(model),
        TrioParams(),
    )
    return hidden, sels


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_batch_selects_as_one_at_a_time(heads: int, kv_heads: int) -> None:
    model = _model(heads, kv_heads)
    hidden, sels = batched(model)
    for b, (n, _, count, k) in enumerate(PROMPTS):
        want_hidden, want = solo(model, b)
        torch.testing.assert_close(hidden[b, :n], want_hidden, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sels[b].saliency, want.saliency, rtol=1e-4, atol=1e-7)
        assert sels[b].keep.tolist() == want.keep.tolist(), b
        assert sels[b].keep.numel() == min(k, count)
        # Not vacuous: the saliency differs between tokens.
        assert want.saliency.std() > 0


def test_padding_and_other_prompts_do_not_leak() -> None:
    """A prompt's saliency is the same next to different neighbours and padding."""
    model = _model(4, 2, seed=1)
    _, sels = batched(model)
    # Change every other prompt's content: prompt 0's result must not move.
    for b in range(1, len(PROMPTS)):
        model["embeds"][b] = torch.randn_like(model["embeds"][b]) * 3
    _, again = batched(model)
    torch.testing.assert_close(again[0].saliency, sels[0].saliency, rtol=1e-5, atol=1e-8)
    assert again[0].keep.tolist() == sels[0].keep.tolist()


def test_single_prompt_layer_runs_as_a_batch_of_one() -> None:
    """The 2-D call is the B = 1 case of the batched layer, bit for bit."""
    model = _model(4, 2)
    layer, rotary = model["layers"][1], model["rotary"]
    h = model["embeds"][2]
    pos, qi = torch.arange(h.shape[0]), torch.tensor([3, 56, 57, 58, 59])
    for query in (None, qi):
        one = decoder_layer(h, layer, rotary, pos, query)
        batch = decoder_layer(
            h[None], layer, rotary, pos[None], None if query is None else query[None]
        )
        assert torch.equal(one, batch[0])


def test_pad_rows() -> None:
    out = pad_rows([torch.ones(2, 3), torch.full((4, 3), 2.0)], value=-1)
    assert out.shape == (2, 4, 3)
    assert out[0, :2].eq(1).all() and out[0, 2:].eq(-1).all() and out[1].eq(2).all()


def test_plan_batches_caps_padded_rows() -> None:
    lengths = [300, 90, 2900, 100, 95, 3000, 40, 5000]
    batches = plan_batches(lengths, max_rows=6000)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert b == sorted(b)
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 6000
    assert [7] in batches  # longer than the cap: alone
    assert [2, 5] in batches  # the two long prompts together (2 x 3000)
    assert [0, 1, 3, 4, 6] in batches  # the short ones together
    assert plan_batches(lengths, max_rows=6000) == batches  # deterministic
    assert plan_batches([10, 10, 10], max_rows=1) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="max_rows"):
        plan_batches([10], max_rows=0)
