"""Autograd-aware collectives: the forward/backward pairs that tensor and sequence parallelism are built from.

Each forward collective is paired with its adjoint in backward, so gradients are exact:

====================================  ===============================  ===============================
function                              forward                          backward
====================================  ===============================  ===============================
copy_to_tensor_parallel_region        identity                         all-reduce (sum)
reduce_from_tensor_parallel_region    all-reduce (sum)                 identity
scatter_to_tensor_parallel_region     split last dim                   all-gather last dim
gather_from_tensor_parallel_region    all-gather last dim              split last dim
scatter_to_sequence_parallel_region   split sequence dim               all-gather sequence dim
gather_from_sequence_parallel_region  all-gather sequence dim          reduce-scatter (or split, see fn)
reduce_scatter_to_sequence_parallel_  reduce-scatter sequence dim      all-gather sequence dim
region
====================================  ===============================  ===============================

All are identities at tp = 1 and issue no collective. ``tp=None`` reads the parallel state at call time; layers
always pass the `TensorParallel` they captured at construction. Our models use (batch, seq, hidden): seq_dim=1.
"""

from __future__ import annotations

import torch

from . import collectives as c
from .state import TensorParallel, resolve_tp


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
        ctx.tp = tp
        return x.view_as(x)  # a view, so autograd records this node

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return c.all_reduce_sum(grad, ctx.tp), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
        return c.all_reduce_sum(x, tp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _Split(torch.autograd.Function):
    """Split along ``dim`` forward, all-gather along ``dim`` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, tp: TensorParallel) -> torch.Tensor:
        ctx.dim, ctx.tp = dim, tp
        return c.split_along_dim(x, dim, tp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return c.all_gather_along_dim(grad, ctx.dim, ctx.tp), None, None


class _Gather(torch.autograd.Function):
    """All-gather along ``dim`` forward; backward reduce-scatters (``reduce_grad``) or splits."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, tp: TensorParallel, reduce_grad: bool) -> torch.Tensor:
        ctx.dim, ctx.tp, ctx.reduce_grad = dim, tp, reduce_grad
        return c.all_gather_along_dim(x, dim, tp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.reduce_grad:
            return c.reduce_scatter_along_dim(grad, ctx.dim, ctx.tp), None, None, None
        return c.split_along_dim(grad, ctx.dim, ctx.tp), None, None, None


class _ReduceScatter(torch.autograd.Function):
    """Reduce-scatter along ``dim`` forward, all-gather along ``dim`` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, tp: TensorParallel) -> torch.Tensor:
        ctx.dim, ctx.tp = dim, tp
        return c.reduce_scatter_along_dim(x, dim, tp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return c.all_gather_along_dim(grad, ctx.dim, ctx.tp), None, None


def copy_to_tensor_parallel_region(x: torch.Tensor, tp: TensorParallel | None = None) -> torch.Tensor:
    """Enter a tensor-parallel region with a replicated input: identity forward, all-reduce backward."""
    tp = resolve_tp(tp)
    return _CopyToTP.apply(x, tp) if tp.is_parallel else x


def reduce_from_tensor_parallel_region(x: torch.Tensor, tp: TensorParallel | None = None) -> torch.Tensor:
    """Leave a tensor-parallel region holding partial sums: all-reduce forward, identity backward."""
    tp = resolve_tp(tp)
    return _ReduceFromTP.apply(x, tp) if tp.is_parallel else x


def scatter_to_tensor_parallel_region(x: torch.Tensor, tp: TensorParallel | None = None) -> torch.Tensor:
    """Keep this rank's chunk of the last dim: split forward, all-gather backward."""
    tp = resolve_tp(tp)
    return _Split.apply(x, x.dim() - 1, tp) if tp.is_parallel else x


def gather_from_tensor_parallel_region(x: torch.Tensor, tp: TensorParallel | None = None) -> torch.Tensor:
    """Concatenate every rank's last-dim chunk: all-gather forward, split backward."""
    tp = resolve_tp(tp)
    return _Gather.apply(x, x.dim() - 1, tp, False) if tp.is_parallel else x


def scatter_to_sequence_parallel_region(
    x: torch.Tensor, seq_dim: int = 1, tp: TensorParallel | None = None
) -> torch.Tensor:
    """Keep this rank's sequence chunk of a replicated tensor: split forward, all-gather backward."""
    tp = resolve_tp(tp)
    return _Split.apply(x, _dim(x, seq_dim), tp) if tp.is_parallel else x


def gather_from_sequence_parallel_region(
    x: torch.Tensor, seq_dim: int = 1, tp: TensorParallel | None = None, to_model_parallel: bool = True
) -> torch.Tensor:
    """All-gather the sequence shards.

    Backward reduce-scatters when the full sequence feeds a tensor-parallel computation (``to_model_parallel``,
    the column-parallel input case: each rank holds a partial gradient of the whole sequence), and only splits when
    the gathered tensor feeds a replicated computation whose gradient is already identical on every rank.
    """
    tp = resolve_tp(tp)
    return _Gather.apply(x, _dim(x, seq_dim), tp, to_model_parallel) if tp.is_parallel else x


def reduce_scatter_to_sequence_parallel_region(
    x: torch.Tensor, seq_dim: int = 1, tp: TensorParallel | None = None
) -> torch.Tensor:
    """Sum partial results and keep this rank's sequence chunk: reduce-scatter forward, all-gather backward."""
    tp = resolve_tp(tp)
    return _ReduceScatter.apply(x, _dim(x, seq_dim), tp) if tp.is_parallel else x


def _dim(x: torch.Tensor, dim: int) -> int:
    return dim % x.dim()  # a negative dim must name the same axis in forward and backward
