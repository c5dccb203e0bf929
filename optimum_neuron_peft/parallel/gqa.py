"""Column-parallel Q/K/V projection for grouped-query attention with replicated key/value heads.

When tp exceeds the number of key/value heads K, every K/V head is replicated ``kv_size_multiplier`` (m) times so
each rank holds whole heads: rank r holds H/tp query heads and K*m/tp key/value head slots, slot j holding the
original head ``kv_head_indices_for_rank(tp, r, K, m, layout)[j]`` (docs/checkpoint_formats.md section 2; checkpoint loading puts
the permuted query heads in place, this layer only projects).

Gradient reduction of the replicas. A replica's gradient only covers the query heads it serves, yet all m replicas
must stay equal to ONE logical weight. So, for K/V weights and biases, the gradient of every slot is replaced by the
sum over all slots (on all ranks) that hold the same original head; that sum is exactly the gradient of the
unreplicated weight, and the replicas receive bit-identical updates under any optimizer.

How it is hooked: forward passes each K/V parameter through `reduce_replica_gradient_in_backward`, an identity
whose backward does that reduction. It acts on each incoming gradient before it is accumulated into ``.grad`` (what
``Tensor.register_hook`` on the parameter would do), so it runs once per backward and, being linear, stays exact
under gradient accumulation - a post-accumulate hook would re-reduce the already-reduced running sum. Unlike a
hook stored on the Parameter object it also survives parameter replacement (``load_state_dict(assign=True)``,
meta-device materialization), and it costs nothing when the parameter is frozen (LoRA): autograd skips it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, SpecError
from ..transformations.gqa_layout import (
    KVLayout,
    check_gqa_shape,
    default_kv_size_multiplier,
    kv_head_indices_for_rank,
    query_head_indices_for_rank,
)
from . import collectives
from .attributes import set_tensor_model_parallel_attributes
from .layers import InitMethod, uniform_init
from .mappings import copy_to_tensor_parallel_region, gather_from_sequence_parallel_region
from .state import TensorParallel, resolve_tp


def reduce_kv_replica_gradient(
    grad: torch.Tensor, head_indices: torch.Tensor, num_key_value_heads: int, head_dim: int, tp: TensorParallel
) -> torch.Tensor:
    """Replace each local head slot's gradient rows by the sum over every slot of the group holding the same head.

    ``grad`` is (slots*head_dim, ...) (a weight or a bias); ``head_indices`` (slots,) the original head of each
    local slot. Scatter-add into a (K, head_dim, ...) buffer, all-reduce it, gather the local slots back.
    """
    slots = head_indices.numel()
    per_slot = grad.reshape(slots, head_dim, *grad.shape[1:])
    buffer = per_slot.new_zeros((num_key_value_heads, head_dim, *grad.shape[1:]))
    buffer.index_add_(0, head_indices, per_slot)
    buffer = collectives.all_reduce_sum(buffer, tp)
    return buffer.index_select(0, head_indices).reshape(grad.shape)


def _reduce_fused_kv_rows(grad: torch.Tensor, q_rows: int, reduce: Callable[[torch.Tensor], torch.Tensor]):
    q, k, v = grad.split([q_rows, (grad.shape[0] - q_rows) // 2, (grad.shape[0] - q_rows) // 2], dim=0)
    return torch.cat([q, reduce(k), reduce(v)], dim=0)


class _ReduceReplicaGrad(torch.autograd.Function):
    """Identity forward; backward applies ``reduce`` to the incoming gradient (see module doc)."""

    @staticmethod
    def forward(ctx, param: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        ctx.reduce = reduce
        return param.view_as(param)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.reduce(grad), None


def reduce_replica_gradient_in_backward(
    param: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``param`` unchanged in forward; in backward its gradient goes through ``reduce`` (the K/V replica sum)."""
    return _ReduceReplicaGrad.apply(param, reduce)


class GQAQKVColumnParallelLinear(nn.Module):
    """Q, K and V projections of GQA attention, column parallel, with replicated key/value heads.

    Parameters per rank: ``weight_q`` (H*hd/tp, in), ``weight_k`` / ``weight_v`` (K*m*hd/tp, in) and optional
    ``bias_q/k/v``; with ``fuse_qkv`` one ``weight_qkv`` = [q; k; v] (and ``bias_qkv``). ``forward(x)`` returns
    the local (q, k, v) projections, (..., H*hd/tp) and twice (..., K*m*hd/tp).
    """

    def __init__(
        self,
        input_size: int,
        num_attention_heads: int,
        num_key_value_heads: int,
        head_dim: int,
        kv_size_multiplier: int | None = None,
        bias: bool = False,
        fuse_qkv: bool = False,
        kv_layout: KVLayout = "tiled",
        sequence_parallel_enabled: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        tp: TensorParallel | None = None,
        init_method: InitMethod | None = None,
        sequence_dim: int = 1,
    ) -> None:
        super().__init__()
        self.tp = tp = resolve_tp(tp)
        H, K = num_attention_heads, num_key_value_heads
        if head_dim < 1:
            raise ConfigError(f"GQAQKVColumnParallelLinear: head_dim must be >= 1, got {head_dim}")
        try:
            m = default_kv_size_multiplier(tp.size, H, K) if kv_size_multiplier is None else kv_size_multiplier
            check_gqa_shape(tp.size, H, K, m, where="GQAQKVColumnParallelLinear")
            kv_heads = kv_head_indices_for_rank(tp.size, tp.rank, K, m, kv_layout)
            q_heads = query_head_indices_for_rank(tp.size, tp.rank, H, K, m, kv_layout)
        except SpecError as err:
            raise ConfigError(str(err)) from err
        self.input_size, self.head_dim = input_size, head_dim
        self.num_attention_heads, self.num_key_value_heads = H, K
        self.kv_size_multiplier, self.kv_layout = m, kv_layout
        self.fuse_qkv, self.sequence_dim = fuse_qkv, sequence_dim
        self.sequence_parallel_enabled = sequence_parallel_enabled
        self.query_head_indices: list[int] = q_heads  # original query head of each local slot (for loaders)
        self.kv_head_indices: list[int] = kv_heads  # original key/value head of each local slot
        self.register_buffer("_kv_index", torch.tensor(kv_heads, dtype=torch.long, device=device), persistent=False)
        self.q_size, self.kv_size = len(q_heads) * head_dim, len(kv_heads) * head_dim

        init = init_method or uniform_init(input_size)
        factory = {"dtype": dtype, "device": device}
        tensors = {"weight": self._init_qkv((input_size,), init, factory)}
        if bias:
            tensors["bias"] = self._init_qkv((), uniform_init(input_size), factory)
        for kind, (q, k, v) in tensors.items():
            names_values = [(f"{kind}_qkv", torch.cat([q, k, v]))] if fuse_qkv else [
                (f"{kind}_q", q), (f"{kind}_k", k), (f"{kind}_v", v)
            ]  # fmt: skip
            for name, value in names_values:
                param = nn.Parameter(value)
                set_tensor_model_parallel_attributes(param, True, 0, 1, tp.size)  # weight_qkv too
                self.register_parameter(name, param)
        if not bias:
            for name in ("bias_qkv",) if fuse_qkv else ("bias_q", "bias_k", "bias_v"):
                self.register_parameter(name, None)

    def _init_qkv(self, trailing: tuple[int, ...], init: InitMethod, factory: dict) -> tuple[torch.Tensor, ...]:
        """Local q, k, v tensors. K/V are drawn for the K original heads, then replicated into the local slots,
        so replicas start identical (across ranks too when every rank uses the same seed)."""
        hd = self.head_dim
        with torch.no_grad():
            q = torch.empty((self.q_size, *trailing), **factory)
            init(q)
            kv = []
            for _ in ("k", "v"):
                full = torch.empty((self.num_key_value_heads * hd, *trailing), **factory)
                init(full)  # 2-D like the unreplicated weight, so fan-in based inits see the usual shape
                per_head = full.view(self.num_key_value_heads, hd, *trailing)
                kv.append(per_head[self._kv_index].reshape(self.kv_size, *trailing))
        return q, kv[0], kv[1]

    @property
    def needs_gradient_reduction(self) -> bool:
        """True when some key/value head has several slots (m > 1), i.e. replicas exist."""
        return self.kv_size_multiplier > 1

    def _kv_reducer(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return partial(
            reduce_kv_replica_gradient,
            head_indices=self._kv_index, num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
            tp=self.tp,
        )  # fmt: skip

    def _kv_param(self, param: torch.Tensor | None, fused: bool) -> torch.Tensor | None:
        if param is None or not self.needs_gradient_reduction or not param.requires_grad:
            return param
        reduce = self._kv_reducer()
        if fused:
            reduce = partial(_reduce_fused_kv_rows, q_rows=self.q_size, reduce=reduce)
        return reduce_replica_gradient_in_backward(param, reduce)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.project(self.parallel_input(x))

    def parallel_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input every rank projects (see `ColumnParallelLinear.parallel_input`)."""
        if self.sequence_parallel_enabled:
            return gather_from_sequence_parallel_region(x, self.sequence_dim, self.tp)
        return copy_to_tensor_parallel_region(x, self.tp)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's (q, k, v) for a `parallel_input`."""
        if self.fuse_qkv:
            qkv = F.linear(x, self._kv_param(self.weight_qkv, True), self._kv_param(self.bias_qkv, True))
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            return q, k, v
        q = F.linear(x, self.weight_q, self.bias_q)
        k = F.linear(x, self._kv_param(self.weight_k, False), self._kv_param(self.bias_k, False))
        v = F.linear(x, self._kv_param(self.weight_v, False), self._kv_param(self.bias_v, False))
        return q, k, v

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size}, heads={self.num_attention_heads}, kv_heads={self.num_key_value_heads}, "
            f"head_dim={self.head_dim}, kv_size_multiplier={self.kv_size_multiplier}, layout={self.kv_layout}, "
            f"fuse_qkv={self.fuse_qkv}, local kv heads={self.kv_head_indices}, tp={self.tp.size}"
        )
