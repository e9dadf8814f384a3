"""Gradient saliency: loss positions, exactness of the query-only saving, and
behaviour inside vLLM's ``torch.inference_mode()``."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from random_llama import random_layer_weights, rotary_table

from vllm_trio.core.llama_layer import (
    LlamaLayerWeights,
    Rotary,
    decoder_layer,
    rms_norm,
)
from vllm_trio.core.saliency import (
    HeadFn,
    LayerFn,
    NormFn,
    gradient_saliency,
    loss_positions,
    proxy_loss,
)

AllRowsFn = Callable[[torch.Tensor], torch.Tensor]

DIM, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB = 32, 4, 2, 8, 48, 50


def reference_positions(seq_len: int, k: int) -> list[int]:
    """The reference's mask, literally: shift logits by one, mark the last k labels."""
    s1 = seq_len - 1  # number of shifted logits; shifted row j is prompt position j
    return sorted({max(0, min(s1 - 1, s1 - 1 - t)) for t in range(k)})


@pytest.mark.parametrize("seq_len", range(2, 24))
@pytest.mark.parametrize("k", [1, 2, 4, 6])
def test_loss_positions_faithful_default(seq_len: int, k: int) -> None:
    assert loss_positions(seq_len, k).tolist() == reference_positions(seq_len, k)


def test_loss_positions_examples() -> None:
    assert loss_positions(10).tolist() == [5, 6, 7, 8]  # S-5..S-2
    assert loss_positions(5).tolist() == [0, 1, 2, 3]
    assert loss_positions(10, include_final=True).tolist() == [6, 7, 8, 9]  # S-4..S-1
    # Short prompts clamp at 0.
    assert loss_positions(4).tolist() == [0, 1, 2]
    assert loss_positions(2).tolist() == [0]
    assert loss_positions(1).tolist() == [0]
    assert loss_positions(3, include_final=True).tolist() == [0, 1, 2]
    assert loss_positions(1, include_final=True).tolist() == [0]
    assert loss_positions(7, 1, include_final=True).tolist() == [6]
    assert loss_positions(7, 10).tolist() == [0, 1, 2, 3, 4, 5]
    assert loss_positions(8, device="cpu").dtype == torch.int64


@pytest.mark.parametrize(("seq_len", "k"), [(0, 4), (5, 0)])
def test_loss_positions_rejects(seq_len: int, k: int) -> None:
    with pytest.raises(ValueError):
        loss_positions(seq_len, k)


def random_layer(
    seed: int,
) -> tuple[LlamaLayerWeights, Rotary, torch.Tensor, torch.Tensor]:
    """A random GQA Llama layer, rotary table, final-norm weight and LM head."""
    g = torch.Generator().manual_seed(seed)
    w = random_layer_weights(
        g, dim=DIM, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, inter=INTER
    )
    norm_w = 1 + torch.randn(DIM, generator=g) * 0.1
    head_w = torch.randn(VOCAB, DIM, generator=g) * 0.5
    return w, rotary_table(HEAD_DIM, 256), norm_w, head_w


def fns(seed: int, seq_len: int) -> tuple[LayerFn, NormFn, HeadFn, AllRowsFn]:
    """Query-only layer, norm, head, and the same layer computing every row."""
    w, rotary, norm_w, head_w = random_layer(seed)
    pos = torch.arange(seq_len)

    def layer_fn(h: torch.Tensor, qi: torch.Tensor) -> torch.Tensor:
        return decoder_layer(h, w, rotary, pos, qi)

    def norm_fn(x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, norm_w, 1e-5)

    def head_fn(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, head_w)

    def layer_all(h: torch.Tensor) -> torch.Tensor:
        return decoder_layer(h, w, rotary, pos)

    return layer_fn, norm_fn, head_fn, layer_all


def brute_force_saliency(
    hidden: torch.Tensor,
    layer_all: AllRowsFn,
    norm_fn: NormFn,
    head_fn: HeadFn,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Every row through the layer, norm and head; the loss slices the positions."""
    leaf = hidden.detach().clone().requires_grad_(True)
    logits = head_fn(norm_fn(layer_all(leaf))).float()
    sel = logits[positions]
    loss = F.cross_entropy(sel, sel.detach().argmax(-1))
    (grad,) = torch.autograd.grad(loss, leaf)
    return grad.norm(dim=-1)


@pytest.mark.parametrize("seq_len", [1, 3, 6, 40])
@pytest.mark.parametrize("include_final", [False, True])
def test_query_only_saliency_is_exact(seq_len: int, include_final: bool) -> None:
    layer_fn, norm_fn, head_fn, layer_all = fns(seq_len, seq_len)
    hidden = torch.randn(seq_len, DIM, generator=torch.Generator().manual_seed(7))
    got = gradient_saliency(hidden, layer_fn, norm_fn, head_fn, 4, include_final)
    positions = loss_positions(seq_len, 4, include_final)
    want = brute_force_saliency(hidden, layer_all, norm_fn, head_fn, positions)
    assert got.shape == (seq_len,)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    if seq_len > 6:
        # Rows after the last loss position cannot influence it (causality).
        last = int(positions[-1])
        assert torch.all(got[last + 1 :] == 0)
        assert torch.all(got[: last + 1] > 0)


def test_proxy_loss_is_mean_ce_against_own_argmax() -> None:
    layer_fn, norm_fn, head_fn, layer_all = fns(0, 12)
    hidden = torch.randn(12, DIM)
    positions = loss_positions(12)
    loss = proxy_loss(hidden, layer_fn, norm_fn, head_fn, positions)
    logits = head_fn(norm_fn(layer_all(hidden)))[positions].double()
    logp = logits.log_softmax(-1)
    want = -logp.max(-1).values.mean()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    assert loss.dtype == torch.float32


def test_bfloat16_hidden_gives_float32_saliency() -> None:
    layer_fn, norm_fn, head_fn, _ = fns(1, 10)
    hidden = torch.randn(10, DIM)
    bf = gradient_saliency(hidden.bfloat16(), layer_fn, norm_fn, head_fn)
    assert bf.dtype == torch.float32


def test_works_under_inference_mode() -> None:
    """vLLM's ``execute_model`` runs under ``torch.inference_mode()``.

    The loss positions must not be inference tensors: ``index_select`` saves
    its index for backward.
    """
    layer_fn, norm_fn, head_fn, _ = fns(2, 20)
    plain = torch.randn(20, DIM, generator=torch.Generator().manual_seed(3))
    want = gradient_saliency(plain, layer_fn, norm_fn, head_fn)
    with torch.inference_mode():
        hidden = plain.clone()
        assert hidden.is_inference()
        got = gradient_saliency(hidden, layer_fn, norm_fn, head_fn)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not hidden.requires_grad


def test_no_graph_or_memory_retained() -> None:
    layer_fn, norm_fn, head_fn, _ = fns(4, 24)
    seen: list[weakref.ref[torch.Tensor]] = []

    def spying_layer(h: torch.Tensor, qi: torch.Tensor) -> torch.Tensor:
        out = layer_fn(h, qi)
        seen.append(weakref.ref(h))  # the leaf
        seen.append(weakref.ref(out))  # a graph node's output
        return out

    hidden = torch.randn(24, DIM)
    sal = gradient_saliency(hidden, spying_layer, norm_fn, head_fn)
    assert sal.grad_fn is None and not sal.requires_grad
    assert not hidden.requires_grad and hidden.grad is None
    gc.collect()
    assert all(ref() is None for ref in seen)

    def live_tensors() -> int:
        gc.collect()
        # type(): isinstance would poke deprecated torch attributes.
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    # Under no_grad, as a serving loop would call it.
    with torch.no_grad():
        gradient_saliency(hidden, layer_fn, norm_fn, head_fn)  # warm-up
        before = live_tensors()
        for _ in range(5):
            gradient_saliency(hidden, layer_fn, norm_fn, head_fn)
        after = live_tensors()
    assert after <= before
