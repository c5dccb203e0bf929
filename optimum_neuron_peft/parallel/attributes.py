"""Tensor-parallel attributes carried by parameters (docs/checkpoint_formats.md section 2) and sequence-parallel gradient sync.

The four attribute names are those of neuronx-distributed / Megatron, so checkpoints and tools written for either
read our parameters unchanged: ``tensor_model_parallel``, ``partition_dim``, ``partition_stride``,
``num_partitions``. The sequence-parallel mark is ``sequence_parallel_enabled`` (neuronx-distributed's name).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import ConfigError
from . import collectives
from .state import TensorParallel

TP_ATTRIBUTES: tuple[str, ...] = ("tensor_model_parallel", "partition_dim", "partition_stride", "num_partitions")
SEQUENCE_PARALLEL_ATTRIBUTE = "sequence_parallel_enabled"
# Set on a sequence-parallel parameter whose layer completes its gradient during backward
# (`reduce_gradient_in_backward`); `allreduce_sequence_parallel_gradients` then leaves it alone.
REDUCED_IN_BACKWARD_ATTRIBUTE = "sequence_parallel_grad_reduced_in_backward"


def set_tensor_model_parallel_attributes(
    param: torch.Tensor, is_parallel: bool, dim: int, stride: int = 1, num_partitions: int = 1
) -> torch.Tensor:
    """Set the four tensor-parallel attributes on ``param`` and return it."""
    if dim not in (0, 1):
        raise ConfigError(f"partition_dim must be 0 or 1, got {dim!r}")
    if stride < 1 or num_partitions < 1:
        raise ConfigError(f"partition_stride and num_partitions must be >= 1, got {stride} and {num_partitions}")
    param.tensor_model_parallel = bool(is_parallel)
    param.partition_dim = dim
    param.partition_stride = stride
    param.num_partitions = num_partitions
    return param


def copy_tensor_model_parallel_attributes(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Copy whichever of the four tensor-parallel attributes ``src`` has onto ``dst``; return ``dst``."""
    for name in TP_ATTRIBUTES:
        if hasattr(src, name):
            setattr(dst, name, getattr(src, name))
    return dst


def is_tensor_model_parallel(param: torch.Tensor) -> bool:
    """True for a parameter that is sharded across the tensor-parallel group."""
    return bool(getattr(param, "tensor_model_parallel", False))


def mark_sequence_parallel(param: torch.Tensor, reduced_in_backward: bool = False) -> torch.Tensor:
    """Mark a replicated parameter that only sees this rank's sequence shard (norm weights, row-parallel bias).

    Its gradient is then a partial sum. ``reduced_in_backward``: the layer passes the parameter through
    `reduce_gradient_in_backward`, so the gradient is complete after backward and
    `allreduce_sequence_parallel_gradients` skips it; otherwise that call completes it.
    """
    setattr(param, SEQUENCE_PARALLEL_ATTRIBUTE, True)
    if reduced_in_backward:
        setattr(param, REDUCED_IN_BACKWARD_ATTRIBUTE, True)
    return param


class _ReduceGradient(torch.autograd.Function):
    """Identity forward; backward sums the incoming gradient over the group, in fp32 (bf16 policy)."""

    @staticmethod
    def forward(ctx, param: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
        ctx.tp = tp
        return param.view_as(param)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return collectives.all_reduce_sum(grad.float(), ctx.tp).to(grad.dtype), None


def reduce_gradient_in_backward(param: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """``param`` as used in forward, with its gradient summed over ``tp``'s group in backward.

    For a replicated parameter that sees a different part of the data on each rank (a sequence shard, other
    heads). It acts on each incoming gradient before accumulation into ``.grad``, so it runs once per backward,
    stays exact under gradient accumulation and with activation checkpointing, and costs nothing on a frozen
    parameter (autograd skips it). The sum is taken in fp32 even for bf16 parameters.
    """
    if not tp.is_parallel or not param.requires_grad:
        return param
    return _ReduceGradient.apply(param, tp)


def sequence_parallel_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters marked by `mark_sequence_parallel` whose gradient is NOT completed in backward."""
    return [
        p for p in module.parameters()
        if getattr(p, SEQUENCE_PARALLEL_ATTRIBUTE, False) and not getattr(p, REDUCED_IN_BACKWARD_ATTRIBUTE, False)
    ]  # fmt: skip


def allreduce_sequence_parallel_gradients(module: nn.Module | Iterable[nn.Module], tp: TensorParallel) -> None:
    """Sum over the tensor-parallel group the gradients of the parameters marked by `mark_sequence_parallel` that
    their layer does not already reduce in backward.

    Our layers (RMSNorm, RowParallelLinear's bias) reduce in backward, so for them this is a no-op, kept for
    existing code; calling it is never a double reduction. For parameters marked by hand, call it once after the
    last backward of an optimizer step (before clipping); the sum is linear, so it is exact for gradients
    accumulated over several micro-batches. One flat all-reduce per dtype, in fp32.
    """
    if not tp.is_parallel:
        return
    modules = [module] if isinstance(module, nn.Module) else list(module)
    seen: set[int] = set()
    grads: dict[torch.dtype, list[torch.Tensor]] = {}
    for mod in modules:
        for param in sequence_parallel_parameters(mod):
            if param.grad is not None and id(param) not in seen:
                seen.add(id(param))
                grads.setdefault(param.grad.dtype, []).append(param.grad)
    for group in grads.values():
        flat = collectives.all_reduce_sum(torch.cat([g.reshape(-1).float() for g in group]), tp)
        offset = 0
        for g in group:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
