"""The side pass over tensor-parallel shards equals the unsharded one.

Two real processes joined by ``torch.distributed`` (gloo, loopback) each hold
one shard of a random Llama layer pair and LM head, sharded the way vLLM's
``QKVParallelLinear``/``MergedColumnParallelLinear``/``RowParallelLinear``/
``ParallelLMHead`` shard them. Forward layers, the proxy-loss gradient and the
NMS selection must match a single process holding the whole weights, also for
a padded batch of two prompts scored at once (each against its solo result). float64
so the only difference left is summation order.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from random_llama import random_layer_weights, rotary_table

from vllm_trio.core import (
    LlamaLayerWeights,
    TensorParallel,
    TrioParams,
    decoder_layer,
    lm_head_logits,
    pad_rows,
    rms_norm,
    select_visual_tokens,
    select_visual_tokens_batch,
)

WORLD = 2
DIM, HEAD_DIM, INTER, VOCAB, PADDED_VOCAB = 48, 8, 64, 100, 128
SEQ, VISUAL = 40, slice(6, 30)


def _model(heads: int, kv_heads: int) -> dict:
    gen = torch.Generator().manual_seed(heads * 10 + kv_heads)
    shape = dict(dim=DIM, heads=heads, kv_heads=kv_heads, head_dim=HEAD_DIM, inter=INTER)
    layers = [random_layer_weights(gen, **shape, scale=0.3, dtype=torch.float64) for _ in range(2)]
    head = torch.randn(PADDED_VOCAB, DIM, generator=gen, dtype=torch.float64) * 0.5
    head[VOCAB:] = 0.0  # vLLM zero-fills the padding rows
    return {
        "layers": layers,
        "rotary": rotary_table(HEAD_DIM, SEQ, torch.float64),
        "norm": 1 + torch.randn(DIM, generator=gen, dtype=torch.float64) * 0.1,
        "head": head,
        "embeds": torch.randn(SEQ, DIM, generator=gen, dtype=torch.float64),
    }


def shard_layer(w: LlamaLayerWeights, rank: int, world: int) -> LlamaLayerWeights:
    """Rank ``rank``'s shard in vLLM's layout.

    Query heads split evenly; KV heads split when there are at least ``world``
    of them, else each rank holds a replica of the one its query heads use.
    """
    hd, heads, kv = w.head_dim, w.num_heads, w.num_kv_heads
    q, k, v = w.qkv.split([heads * hd, kv * hd, kv * hd])
    hq = heads // world
    kv_local = max(1, kv // world)
    kv_first = rank * kv_local if kv >= world else rank // (world // kv)
    q_rows = slice(rank * hq * hd, (rank + 1) * hq * hd)
    kv_rows = slice(kv_first * hd, (kv_first + kv_local) * hd)
    gate, up = w.gate_up.chunk(2)
    inter = gate.shape[0] // world
    i_rows = slice(rank * inter, (rank + 1) * inter)
    return dataclasses.replace(
        w,
        qkv=torch.cat([q[q_rows], k[kv_rows], v[kv_rows]]),
        o_proj=w.o_proj[:, q_rows],
        gate_up=torch.cat([gate[i_rows], up[i_rows]]),
        down=w.down[:, i_rows],
        num_heads=hq,
        num_kv_heads=kv_local,
    )


def _shards(model: dict, tp: TensorParallel | None) -> tuple[list[LlamaLayerWeights], torch.Tensor]:
    rank, world = (0, 1) if tp is None else (tp.rank, tp.world_size)
    layers = [shard_layer(w, rank, world) for w in model["layers"]]
    per_rank = PADDED_VOCAB // world
    return layers, model["head"][rank * per_rank : (rank + 1) * per_rank]


def side_pass(model: dict, k: int, tp: TensorParallel | None, seq: int = SEQ) -> dict:
    """Layer 0 forward, then TRIO's selection at layer 1 (``tp``: sharded weights),
    on the first ``seq`` rows of the prompt."""
    layers, head = _shards(model, tp)
    pos = torch.arange(seq)
    with torch.no_grad():
        hidden = decoder_layer(model["embeds"][:seq], layers[0], model["rotary"], pos, tp=tp)
    selection = select_visual_tokens(
        hidden,
        torch.arange(seq)[VISUAL],
        k,
        lambda h, qi: decoder_layer(h, layers[1], model["rotary"], pos, qi, tp=tp),
        lambda h: rms_norm(h, model["norm"], 1e-5),
        lambda h: lm_head_logits(h, head, VOCAB, tp),
        TrioParams(),
    )
    return {"hidden": hidden, "saliency": selection.saliency, "keep": selection.keep}


#: The batched side pass scores prompts of these lengths (prefixes of the
#: model's prompt), keeping ``k`` and ``k // 2`` of their visual rows.
BATCH_SEQS = (SEQ, 27)


def side_pass_batch(model: dict, k: int, tp: TensorParallel | None) -> list[dict]:
    """:func:`side_pass` of every ``BATCH_SEQS`` prompt, as one padded batch."""
    layers, head = _shards(model, tp)
    prompts = [model["embeds"][:n] for n in BATCH_SEQS]
    pos = pad_rows([torch.arange(n) for n in BATCH_SEQS])
    with torch.no_grad():
        hidden = decoder_layer(pad_rows(prompts), layers[0], model["rotary"], pos, tp=tp)
    selections = select_visual_tokens_batch(
        hidden,
        BATCH_SEQS,
        [torch.arange(n)[VISUAL] for n in BATCH_SEQS],
        [k, k // 2],
        lambda h, qi: decoder_layer(h, layers[1], model["rotary"], pos, qi, tp=tp),
        lambda h: rms_norm(h, model["norm"], 1e-5),
        lambda h: lm_head_logits(h, head, VOCAB, tp),
        TrioParams(),
    )
    return [
        {"hidden": hidden[b, :n], "saliency": s.saliency, "keep": s.keep}
        for b, (n, s) in enumerate(zip(BATCH_SEQS, selections, strict=True))
    ]


def _torch_tp(rank: int, world: int) -> TensorParallel:
    def all_reduce(x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def all_gather(x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=-1)

    return TensorParallel(world, rank, all_reduce, all_gather)


def _rank_main(rank: int, out_dir: str, heads: int, kv_heads: int, k: int) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD
    )
    try:
        model, tp = _model(heads, kv_heads), _torch_tp(rank, WORLD)
        result = {"solo": side_pass(model, k, tp), "batch": side_pass_batch(model, k, tp)}
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("heads", "kv_heads"), [(4, 2), (4, 1), (4, 4)], ids=["gqa-split", "kv-replicated", "mha"]
)
def test_sharded_side_pass_matches_unsharded(tmp_path: Path, heads: int, kv_heads: int) -> None:
    k = 6
    mp.start_processes(
        _rank_main, args=(str(tmp_path), heads, kv_heads, k), nprocs=WORLD, start_method="spawn"
    )
    model = _model(heads, kv_heads)
    whole = side_pass(model, k, None)
    # The batched sharded pass must give each prompt its unsharded solo result.
    alone = [side_pass(model, kk, None, n) for n, kk in zip(BATCH_SEQS, (k, k // 2), strict=True)]
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        for shard, want in zip([result["solo"], *result["batch"]], [whole, *alone], strict=True):
            torch.testing.assert_close(shard["hidden"], want["hidden"], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(shard["saliency"], want["saliency"], rtol=1e-6, atol=1e-9)
            assert shard["keep"].tolist() == want["keep"].tolist()
    # Not a vacuous comparison: the gradient is spread over the visual tokens.
    assert whole["saliency"].min() > 0 and whole["saliency"].std() > 0


def test_collectives_are_skipped_without_gradients() -> None:
    """Forward-only layers (0..L-1) call the plain collective, no autograd node."""
    calls: list[str] = []

    def all_reduce(x: torch.Tensor) -> torch.Tensor:
        calls.append("reduce")
        return x

    tp = TensorParallel(1, 0, all_reduce, lambda x: x)
    x = torch.ones(3, 4, requires_grad=True)
    with torch.no_grad():
        assert tp.reduce(x) is x and tp.enter(x) is x
    assert calls == ["reduce"]
    y = tp.reduce(x * 2)
    assert y.grad_fn is not None and calls == ["reduce", "reduce"]


def test_conjugate_gradients_single_rank() -> None:
    """With one rank every operator is the identity, forward and backward."""
    tp = TensorParallel(1, 0, lambda x: x, lambda x: x)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 6, dtype=torch.float64)
    out = tp.gather_last_dim(F.linear(tp.enter(x), w))
    out = tp.reduce(out)
    (grad,) = torch.autograd.grad(out.pow(2).sum(), x)
    (expected,) = torch.autograd.grad(F.linear(x, w).pow(2).sum(), x)
    torch.testing.assert_close(grad, expected)
