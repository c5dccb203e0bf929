"""ZeRO-1: the optimizer state of the trainable parameters sharded over the data-parallel group.

Built on torch's own `torch.distributed.optim.ZeroRedundancyOptimizer`: each data-parallel rank owns whole
parameters (a greedy partition by size, the same on every rank), keeps the optimizer state of those only, steps them
with the wrapped optimizer, then broadcasts them. Each parameter goes through the same optimizer arithmetic as
without sharding, so the result equals the unsharded optimizer's (bit-exact on CPU, tested). With tensor
parallelism every tp rank runs its own ZeRO over its data-parallel group: the replicas of a tp shard.

What torch's class lacks, and this module adds (by hand because no library offers it on a bare process group):

- the data-parallel gradient reduction it assumes DDP did (`allreduce_data_parallel_gradients`: one flat
  all-reduce per dtype, summed in fp32 - the bf16 policy - then averaged); the package's only data-parallel
  reduction (the Trainer's too; `allreduce_data_parallel_` does it on plain tensors);
- a full (unsharded) state dict in one call that also works without sharding (`full_optimizer_state_dict`), and a
  load that does not mutate the caller's dict (`load_full_optimizer_state_dict`). The full state dict is the plain
  ``torch.optim`` format, indexed by parameter order, so it does not depend on the dp size: save at dp = 2, resume
  at dp = 1 or 4, or with a plain optimizer.

Use::

    opt = make_zero1_optimizer(trainable_params, torch.optim.AdamW, lr=1e-4)   # dp group from parallel state
    loss.backward(); allreduce_data_parallel_gradients(trainable_params); opt.step(); opt.zero_grad()
    state = full_optimizer_state_dict(opt)          # collective; the full dict on dp rank 0, None elsewhere
    load_full_optimizer_state_dict(opt, state)      # every dp rank passes the full dict; keeps its shard
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer

from ..errors import ConfigError
from .state import get_data_parallel_group, get_data_parallel_size

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


def _group_size(dp_group: Any | None) -> int:
    if dp_group is None:
        return get_data_parallel_size()
    return dist.get_world_size(dp_group)


def make_zero1_optimizer(params: ParamsT, optimizer_cls: type[torch.optim.Optimizer], dp_group: Any | None = None,
                         **defaults: Any) -> torch.optim.Optimizer:  # fmt: skip
    """``optimizer_cls(params, **defaults)`` with its state sharded over ``dp_group`` (ZeRO-1).

    ``dp_group`` defaults to the data-parallel group of `initialize_model_parallel`. With one data-parallel rank
    (or no process group) the plain optimizer is returned: nothing to shard. Pass only trainable parameters.
    """
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise ConfigError(f"optimizer_cls must be a torch.optim.Optimizer subclass, got {optimizer_cls!r}")
    params = list(params)
    if not params:
        raise ConfigError("make_zero1_optimizer: no parameters given (pass the trainable parameters)")
    if not (dist.is_available() and dist.is_initialized()) or _group_size(dp_group) == 1:
        return optimizer_cls(params, **defaults)
    group = dp_group if dp_group is not None else get_data_parallel_group()
    return ZeroRedundancyOptimizer(params, optimizer_class=optimizer_cls, process_group=group, **defaults)


def allreduce_data_parallel_gradients(params: Iterable[torch.Tensor], dp_group: Any | None = None,
                                      average: bool = True) -> None:  # fmt: skip
    """Sum (``average``: mean) the gradients of ``params`` over the data-parallel group, in fp32.

    Call once per optimizer step after the last backward (gradient accumulation sums first, which is linear).
    Parameters without a gradient are skipped; every rank must have gradients for the same parameters.
    """
    allreduce_data_parallel_([p.grad for p in params if p.grad is not None], dp_group, average)


def allreduce_data_parallel_(tensors: Iterable[torch.Tensor], dp_group: Any | None = None,
                             average: bool = True) -> None:  # fmt: skip
    """Sum (``average``: mean, what DDP does to gradients) ``tensors`` in place over the data-parallel group: one
    flat all-reduce per dtype, accumulated in fp32 (gloo has no AVG: sum, then divide)."""
    size = _group_size(dp_group)
    if size == 1 or not (dist.is_available() and dist.is_initialized()):
        return
    group = dp_group if dp_group is not None else get_data_parallel_group()
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype_tensors in by_dtype.values():
        flat = torch.cat([t.reshape(-1).float() for t in dtype_tensors])
        dist.all_reduce(flat, group=group)
        if average:
            flat /= size
        offset = 0
        for t in dtype_tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def full_optimizer_state_dict(optimizer: torch.optim.Optimizer, to: int = 0) -> dict[str, Any] | None:
    """The unsharded optimizer state dict (plain ``torch.optim`` format) on data-parallel rank ``to``; None on the
    other ranks. Collective over the data-parallel group for a sharded optimizer."""
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.consolidate_state_dict(to=to)
        return optimizer.state_dict() if optimizer.rank == to else None
    return optimizer.state_dict()


def load_full_optimizer_state_dict(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """Load a full state dict (from `full_optimizer_state_dict`, at any data-parallel size, or from a plain
    optimizer over the same parameters in the same order); a sharded optimizer keeps only its own parameters'
    state. Every data-parallel rank must pass the full dict. ``state_dict`` is not modified."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ConfigError("load_full_optimizer_state_dict: expected a torch optimizer state dict with 'state' and 'param_groups'")
    # ZeroRedundancyOptimizer.load_state_dict blanks the other ranks' entries of the dict it is given.
    copy = {**state_dict, "state": dict(state_dict["state"]),
            "param_groups": [dict(g) for g in state_dict["param_groups"]]}  # fmt: skip
    optimizer.load_state_dict(copy)


__all__ = [
    "allreduce_data_parallel_",
    "allreduce_data_parallel_gradients",
    "full_optimizer_state_dict",
    "load_full_optimizer_state_dict",
    "make_zero1_optimizer",
]
