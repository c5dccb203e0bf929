"""Plain (non-autograd) collectives over a `TensorParallel` group, along any tensor dimension.

Every function returns a new tensor and never modifies its input, so the autograd functions in `mappings` can use
them on saved inputs and incoming gradients alike. At size 1 they return the input (or a copy where a new tensor
is the contract) without touching torch.distributed.

Only list-based ``all_gather`` / ``reduce_scatter`` and ``all_reduce`` are used: every backend (gloo, nccl, the
XLA backend) implements them, while the ``*_tensor`` variants are missing or deprecated on some. Backends without
``reduce_scatter`` (gloo before torch 2.x, some custom backends) fall back to all_reduce + slice, which moves tp
times more data but is exact.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import ConfigError
from .state import TensorParallel

# Backend names seen to lack reduce_scatter; filled on the first failure so later calls go straight to the fallback.
_NO_REDUCE_SCATTER: set[str] = set()


def _check_divisible(tensor: torch.Tensor, dim: int, tp: TensorParallel, what: str) -> int:
    size = tensor.shape[dim]
    if size % tp.size != 0:
        raise ConfigError(
            f"{what}: dimension {dim} of a tensor of shape {tuple(tensor.shape)} has size {size}, which is not "
            f"divisible by the tensor-parallel size {tp.size}; pad it to a multiple of {tp.size}"
        )
    return size // tp.size


def split_along_dim(tensor: torch.Tensor, dim: int, tp: TensorParallel) -> torch.Tensor:
    """This rank's contiguous chunk of ``tensor`` along ``dim`` (a contiguous copy; no communication)."""
    if not tp.is_parallel:
        return tensor
    chunk = _check_divisible(tensor, dim, tp, "split")
    return tensor.narrow(dim, tp.rank * chunk, chunk).contiguous()


def _all_reduce(tensor: torch.Tensor, tp: TensorParallel, op: dist.ReduceOp) -> torch.Tensor:
    if not tp.is_parallel:
        return tensor
    out = tensor.contiguous().clone()
    dist.all_reduce(out, op=op, group=tp.group)
    return out


def all_reduce_sum(tensor: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Sum of ``tensor`` over the group (a new tensor)."""
    return _all_reduce(tensor, tp, dist.ReduceOp.SUM)


def all_reduce_max(tensor: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over the group (a new tensor)."""
    return _all_reduce(tensor, tp, dist.ReduceOp.MAX)


def all_gather_along_dim(tensor: torch.Tensor, dim: int, tp: TensorParallel) -> torch.Tensor:
    """Concatenation along ``dim`` of every rank's ``tensor``, in rank order."""
    if not tp.is_parallel:
        return tensor
    local = tensor.contiguous()
    parts = [torch.empty_like(local) for _ in range(tp.size)]
    dist.all_gather(parts, local, group=tp.group)
    return torch.cat(parts, dim=dim)


def reduce_scatter_along_dim(tensor: torch.Tensor, dim: int, tp: TensorParallel) -> torch.Tensor:
    """This rank's chunk along ``dim`` of the sum over the group of ``tensor``."""
    if not tp.is_parallel:
        return tensor
    _check_divisible(tensor, dim, tp, "reduce_scatter")
    backend = _backend_name(tp)
    if backend not in _NO_REDUCE_SCATTER:
        parts = [part.contiguous() for part in tensor.chunk(tp.size, dim=dim)]
        out = torch.empty_like(parts[tp.rank])
        try:
            dist.reduce_scatter(out, parts, op=dist.ReduceOp.SUM, group=tp.group)
            return out
        except (RuntimeError, NotImplementedError, ValueError):
            # Every rank of a group shares the backend, so all of them take this branch together.
            _NO_REDUCE_SCATTER.add(backend)
    return reduce_scatter_fallback(tensor, dim, tp)


def reduce_scatter_fallback(tensor: torch.Tensor, dim: int, tp: TensorParallel) -> torch.Tensor:
    """reduce_scatter as all_reduce + slice, for backends without reduce_scatter (exact, more traffic)."""
    return split_along_dim(all_reduce_sum(tensor, tp), dim, tp)


def _backend_name(tp: TensorParallel) -> str:
    try:
        return str(dist.get_backend(tp.group))
    except Exception:  # groups of foreign runtimes may not answer; treat them as one unknown backend
        return "unknown"
