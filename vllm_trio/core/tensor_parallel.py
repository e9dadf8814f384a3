"""Differentiable collectives for a side pass over tensor-parallel weight shards.

Under vLLM's tensor parallelism each rank holds a slice of every decoder layer:
q/k/v, gate/up and the LM head are split by output rows (column-parallel),
o_proj and down by input columns (row-parallel). vLLM's forward needs only an
all-reduce after each row-parallel layer and a gather of the logits. TRIO also
differentiates, and a gradient through shards needs each collective's
conjugate (Megatron-LM's f/g operators, Shoeybi et al. 2019):

* ``enter`` (f) before a column-parallel layer: identity forward, all-reduce
  backward, because each rank's shard sends back only its part of the
  gradient of the (replicated) input;
* ``reduce`` (g) after a row-parallel layer: all-reduce forward, identity
  backward, because the summed output's gradient is already whole on every
  rank;
* ``gather_last_dim`` for vocabulary-split logits: all-gather forward, each
  rank keeps its own slice of the gradient backward.

With these, the loss and the gradient of the replicated hidden states are the
same on every rank as without tensor parallelism (up to summation order).

The collectives themselves come from the caller (vLLM's process group in the
binding, ``torch.distributed`` in tests): this module imports no vLLM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

#: Sums a tensor over the group. May reuse its argument's storage (vLLM's CPU
#: all-reduce works in place), so callers pass tensors nothing else holds.
AllReduce = Callable[[torch.Tensor], torch.Tensor]
#: Concatenates every rank's tensor along the last dimension, in rank order.
AllGather = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TensorParallel:
    """One tensor-parallel group as seen by one rank."""

    world_size: int
    rank: int
    all_reduce: AllReduce
    all_gather: AllGather

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """Input of a column-parallel layer (Megatron's f)."""
        if not _needs_grad(x):
            return x
        return _CopyToShards.apply(x, self)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of row-parallel partial outputs (Megatron's g)."""
        if not _needs_grad(x):
            return self.all_reduce(x)
        return _ReduceFromShards.apply(x, self)

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's slice of the last dimension, concatenated (logits)."""
        if not _needs_grad(x):
            return self.all_gather(x)
        return _GatherShards.apply(x, self)


def _needs_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


class _CopyToShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
        ctx.tp = tp
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.tp.all_reduce(grad.clone()), None


class _ReduceFromShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
        return tp.all_reduce(x.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _GatherShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
        ctx.tp, ctx.width = tp, x.shape[-1]
        return tp.all_gather(x.contiguous())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        start = ctx.tp.rank * ctx.width
        return grad[..., start : start + ctx.width].contiguous(), None
