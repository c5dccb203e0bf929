"""Tensor-parallel linear and embedding layers (neuronx-distributed compatible parameter names and attributes).

Shapes per rank (docs/checkpoint_formats.md section 2):

- `ColumnParallelLinear`: ``weight`` (out/tp, in), ``bias`` (out/tp); partition_dim 0.
- `RowParallelLinear`: ``weight`` (out, in/tp), partition_dim 1; ``bias`` (out) full and replicated, added after
  the reduction.
- `ParallelEmbedding`: ``weight`` (vocab/tp, dim), partition_dim 0.

With ``sequence_parallel_enabled`` activations between layers hold a sequence shard, (batch, seq/tp, hidden):
the column-parallel input is all-gathered along the sequence, the row-parallel / embedding output is
reduce-scattered to it. Sizes must divide by tp: padding belongs to checkpoint loading, not here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .attributes import mark_sequence_parallel, reduce_gradient_in_backward, set_tensor_model_parallel_attributes
from .mappings import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)
from .state import TensorParallel, resolve_tp

InitMethod = Callable[[torch.Tensor], object]


def divide(numerator: int, denominator: int, what: str, by: str = "the tensor-parallel size") -> int:
    """``numerator // denominator``, or a `ConfigError` naming ``what`` when it does not divide."""
    if numerator % denominator != 0:
        raise ConfigError(
            f"{what}={numerator} must be divisible by {by} ({denominator}); pad it to a multiple of "
            f"{denominator} when loading the checkpoint, or choose another tensor-parallel size"
        )
    return numerator // denominator


def uniform_init(fan_in: int) -> InitMethod:
    """nn.Linear's default distribution, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), with the FULL (unsharded) fan-in."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return lambda t: nn.init.uniform_(t, -bound, bound)


def _new_param(shape: tuple[int, ...], dtype: torch.dtype | None, device, init: InitMethod) -> nn.Parameter:
    param = nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
    with torch.no_grad():
        init(param)
    return param


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split across ranks (partition_dim 0).

    ``gather_output`` all-gathers the output to the full width (in original column order, also for stride > 1);
    otherwise each rank returns its (..., out/tp) slice, the input of a `RowParallelLinear`. With
    ``stride`` s, rank r holds the chunks r, r+tp, ... of size out/(tp*s) (interleaved fused weights).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        gather_output: bool = True,
        sequence_parallel_enabled: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        tp: TensorParallel | None = None,
        stride: int = 1,
        init_method: InitMethod | None = None,
        sequence_dim: int = 1,
    ) -> None:
        super().__init__()
        self.tp = resolve_tp(tp)
        if stride < 1:
            raise ConfigError(f"ColumnParallelLinear: stride must be >= 1, got {stride}")
        self.input_size, self.output_size, self.stride = input_size, output_size, stride
        divide(output_size, self.tp.size * stride, "ColumnParallelLinear output_size", "tp size x stride")
        self.output_size_per_partition = output_size // self.tp.size
        self.gather_output = gather_output
        self.sequence_parallel_enabled = sequence_parallel_enabled
        self.sequence_dim = sequence_dim
        init = init_method or uniform_init(input_size)
        self.weight = _new_param((self.output_size_per_partition, input_size), dtype, device, init)
        set_tensor_model_parallel_attributes(self.weight, True, 0, stride, self.tp.size)
        if bias:
            self.bias = _new_param((self.output_size_per_partition,), dtype, device, uniform_init(input_size))
            set_tensor_model_parallel_attributes(self.bias, True, 0, stride, self.tp.size)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.parallel_input(x))

    def parallel_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input every rank multiplies: the gathered sequence (SP), or ``x`` with an all-reduce of its gradient.

        Split from `project` so that a LoRA branch can share it: one gather, one gradient reduction for both.
        """
        if self.sequence_parallel_enabled:
            return gather_from_sequence_parallel_region(x, self.sequence_dim, self.tp)
        return copy_to_tensor_parallel_region(x, self.tp)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's output rows for a `parallel_input` (all-gathered to the full width with ``gather_output``)."""
        y = F.linear(x, self.weight, self.bias)
        if not self.gather_output:
            return y
        y = gather_from_tensor_parallel_region(y, self.tp)
        if self.stride > 1 and self.tp.is_parallel:
            # Gathered columns are ordered (rank, chunk-of-rank); the original order is (chunk-of-rank, rank).
            chunk = self.output_size // (self.tp.size * self.stride)
            y = y.unflatten(-1, (self.tp.size, self.stride, chunk)).transpose(-3, -2).flatten(-3)
        return y

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size}, out={self.output_size} (per rank {self.output_size_per_partition}), "
            f"bias={self.bias is not None}, gather_output={self.gather_output}, stride={self.stride}, "
            f"sequence_parallel={self.sequence_parallel_enabled}, tp={self.tp.size}"
        )


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns split across ranks (partition_dim 1) and the partial sums reduced.

    ``input_is_parallel``: x already holds this rank's (..., in/tp) slice (the output of a `ColumnParallelLinear`
    with ``gather_output=False``); otherwise the full x is split here. The bias is replicated and added once,
    after the reduction; under sequence parallelism it only sees the sequence shard, so its gradient is summed over
    the group in backward (`reduce_gradient_in_backward`).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        input_is_parallel: bool = True,
        sequence_parallel_enabled: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        tp: TensorParallel | None = None,
        init_method: InitMethod | None = None,
        sequence_dim: int = 1,
    ) -> None:
        super().__init__()
        self.tp = resolve_tp(tp)
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = divide(input_size, self.tp.size, "RowParallelLinear input_size")
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel_enabled = sequence_parallel_enabled
        self.sequence_dim = sequence_dim
        init = init_method or uniform_init(input_size)
        self.weight = _new_param((output_size, self.input_size_per_partition), dtype, device, init)
        set_tensor_model_parallel_attributes(self.weight, True, 1, 1, self.tp.size)
        if bias:
            self.bias = _new_param((output_size,), dtype, device, uniform_init(input_size))
            set_tensor_model_parallel_attributes(self.bias, False, 0, 1, 1)
            if sequence_parallel_enabled:  # completed in backward (see forward)
                mark_sequence_parallel(self.bias, reduced_in_backward=True)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce_partial(F.linear(self.parallel_input(x), self.weight))

    def parallel_input(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's input columns."""
        return x if self.input_is_parallel else scatter_to_tensor_parallel_region(x, self.tp)

    def reduce_partial(self, y: torch.Tensor) -> torch.Tensor:
        """Sum the ranks' partial outputs (reduce-scatter to the sequence chunk under SP), then add the bias.

        Split from `forward` so that a LoRA branch can add its own partial result before this single reduction.
        """
        if self.sequence_parallel_enabled:
            y = reduce_scatter_to_sequence_parallel_region(y, self.sequence_dim, self.tp)
        else:
            y = reduce_from_tensor_parallel_region(y, self.tp)
        if self.bias is None:
            return y
        # Under sequence parallelism the bias only sees this rank's sequence chunk: sum its gradient in backward.
        return y + (reduce_gradient_in_backward(self.bias, self.tp) if self.sequence_parallel_enabled else self.bias)

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size} (per rank {self.input_size_per_partition}), out={self.output_size}, "
            f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}, "
            f"sequence_parallel={self.sequence_parallel_enabled}, tp={self.tp.size}"
        )


class ParallelEmbedding(nn.Module):
    """Embedding with the vocabulary (rows) split across ranks; rank r holds ids [r*V/tp, (r+1)*V/tp).

    Ids outside this rank's range look up a zero row, then the partial embeddings are summed over the group
    (all-reduce, or reduce-scatter to the sequence shard under sequence parallelism).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        tp: TensorParallel | None = None,
        init_method: InitMethod | None = None,
        sequence_parallel_enabled: bool = False,
        sequence_dim: int = 1,
    ) -> None:
        super().__init__()
        self.tp = resolve_tp(tp)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        per_rank = divide(num_embeddings, self.tp.size, "ParallelEmbedding num_embeddings")
        if padding_idx is not None and not -num_embeddings <= padding_idx < num_embeddings:
            raise ConfigError(f"ParallelEmbedding: padding_idx={padding_idx} is outside [0, {num_embeddings})")
        self.padding_idx = padding_idx % num_embeddings if padding_idx is not None else None
        self.vocab_start_index = self.tp.rank * per_rank
        self.vocab_end_index = self.vocab_start_index + per_rank
        self.sequence_parallel_enabled = sequence_parallel_enabled
        self.sequence_dim = sequence_dim
        self.weight = _new_param((per_rank, embedding_dim), dtype, device, init_method or nn.init.normal_)
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1, self.tp.size)
        local_padding = self._local_padding_idx()
        if local_padding is not None:
            with torch.no_grad():
                self.weight[local_padding].zero_()

    def _local_padding_idx(self) -> int | None:
        if self.padding_idx is None or not self.vocab_start_index <= self.padding_idx < self.vocab_end_index:
            return None
        return self.padding_idx - self.vocab_start_index

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.tp.is_parallel:
            return F.embedding(input_ids, self.weight, self.padding_idx)
        outside = (input_ids < self.vocab_start_index) | (input_ids >= self.vocab_end_index)
        local_ids = (input_ids - self.vocab_start_index).masked_fill(outside, 0)
        y = F.embedding(local_ids, self.weight, self._local_padding_idx())
        y = y.masked_fill(outside.unsqueeze(-1), 0.0)  # also zeroes the gradient sent to row 0 for those ids
        if self.sequence_parallel_enabled:
            return reduce_scatter_to_sequence_parallel_region(y, self.sequence_dim, self.tp)
        return reduce_from_tensor_parallel_region(y, self.tp)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.vocab_start_index}, {self.vocab_end_index}), "
            f"padding_idx={self.padding_idx}, sequence_parallel={self.sequence_parallel_enabled}, tp={self.tp.size}"
        )
