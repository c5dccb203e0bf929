"""What the tensor-parallel layout adds to a training step: the global gradient norm and clipping with it.

The data-parallel gradient average is `parallel.zero.allreduce_data_parallel_gradients` (fp32 reduction).

The global gradient norm is the norm of the gradient of the ONE logical model (what transformers.Trainer computes
on one device): every element counted once. A tensor-parallel shard is counted on its rank; a replicated parameter
(LoRA A of a column-parallel layer, LoRA B of a row-parallel one) on tensor-parallel rank 0 only; a key/value head
replicated ``kv_size_multiplier`` times (GQA with fewer kv heads than tp) only in its replica 0.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..parallel import TensorParallel, is_tensor_model_parallel
from ..parallel.gqa import GQAQKVColumnParallelLinear
from ..transformations.gqa_layout import kv_replicas_for_rank

# Which rows of a parameter this rank counts: None = all of them, an index tensor = those rows.
Share = tuple[nn.Parameter, torch.Tensor | None]


def _replica_zero_rows(module: GQAQKVColumnParallelLinear, tp: TensorParallel) -> torch.Tensor:
    """Rows of the local key/value head slots that hold replica 0 of their head."""
    slots = kv_replicas_for_rank(tp.size, tp.rank, module.num_key_value_heads, module.kv_size_multiplier,
                                 module.kv_layout)  # fmt: skip
    hd = module.head_dim
    return torch.tensor([j * hd + i for j, (_, replica) in enumerate(slots) if replica == 0 for i in range(hd)],
                        dtype=torch.long)  # fmt: skip


def _gqa_base(module: nn.Module) -> GQAQKVColumnParallelLinear | None:
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return base if isinstance(base, GQAQKVColumnParallelLinear) and base.kv_size_multiplier > 1 else None


def norm_shares(model: nn.Module, tp: TensorParallel) -> list[Share]:
    """Every trainable parameter this rank counts in the global norm, with the rows it counts (see module doc)."""
    shares: list[Share] = []
    seen: set[int] = set()

    def add(param: nn.Parameter, rows: torch.Tensor | None) -> None:
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            shares.append((param, rows))

    for module in model.modules():
        gqa = _gqa_base(module)
        if gqa is not None and hasattr(module, "lora_B"):
            # a LoRA layer on a GQA layer with kv replicas: its B_k / B_v hold the local head slots, like weight_k
            for sub in module.lora_B.values():
                for name, param in sub.named_parameters(recurse=False):
                    kv = name in ("weight_k", "weight_v")
                    add(param, _replica_zero_rows(gqa, tp) if kv else _default_rows(param, tp))
        for name, param in module.named_parameters(recurse=False):
            add(param, _base_rows(param, name, module, tp))
    return shares


def _default_rows(param: nn.Parameter, tp: TensorParallel) -> torch.Tensor | None:
    """A shard: all its rows on its rank. A replicated parameter: all rows on rank 0, none elsewhere."""
    if is_tensor_model_parallel(param) or tp.rank == 0:
        return None
    return torch.empty(0, dtype=torch.long)


def _base_rows(param: nn.Parameter, name: str, module: nn.Module, tp: TensorParallel) -> torch.Tensor | None:
    if isinstance(module, GQAQKVColumnParallelLinear) and module.kv_size_multiplier > 1:
        if name in ("weight_k", "weight_v", "bias_k", "bias_v"):
            return _replica_zero_rows(module, tp)
        if name in ("weight_qkv", "bias_qkv"):
            kv = _replica_zero_rows(module, tp)
            return torch.cat([torch.arange(module.q_size), kv + module.q_size, kv + module.q_size + module.kv_size])
    return _default_rows(param, tp)


def global_grad_norm(shares: Iterable[Share], tp: TensorParallel) -> torch.Tensor:
    """The 2-norm of all gradients of the logical model, equal on every rank (float32)."""
    total = torch.zeros((), dtype=torch.float32)
    for param, rows in shares:
        if param.grad is None:
            continue
        grad = param.grad if rows is None else param.grad.index_select(0, rows.to(param.grad.device))
        total = total + grad.detach().float().pow(2).sum().cpu()
    if tp.is_parallel:
        dist.all_reduce(total, group=tp.group)
    return total.sqrt()


def clip_grads_with_norm_(params: Iterable[nn.Parameter], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale the gradients like ``torch.nn.utils.clip_grad_norm_`` does for a given total norm."""
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))
