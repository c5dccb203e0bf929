"""LoRA on the GQA QKV column-parallel layer: separate q, k and v adapters, laid out like the base weights.

Per adapter, only for the targeted projections: ``lora_A[adapter].weight_{q,k,v}`` (r_p, hidden), replicated, and
``lora_B[adapter].weight_{q,k,v}`` holding this rank's rows in the base layer's order: the rank's (permuted) query
heads for q, its key/value head slots (replicas included) for k and v.

Key/value replicas: a slot of B_k only receives the gradient of the query heads it serves; like the base
``weight_k``, the gradient of every slot is replaced by the sum over all slots holding the same original head
(`reduce_kv_replica_gradient`), so the replicas stay equal and equal to the original B_k's gradient. The shared
activation ``h = x A^T`` needs no such care: the all-reduce of its gradient sums disjoint contributions.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ..errors import ConfigError
from ..parallel import GQAQKVColumnParallelLinear, reduce_kv_replica_gradient, reduce_replica_gradient_in_backward
from ..transformations.parallel_plan import FUSED_GROUPS
from ..transformations.spec_fields import QKV
from .fused import FUSED_LAYOUT_ATTRIBUTE, FusedProjections, MultiProjectionLora


def default_qkv_layout(module: GQAQKVColumnParallelLinear) -> FusedProjections:
    hd = module.head_dim
    return FusedProjections(
        keys=QKV,
        original_names=FUSED_GROUPS["qkv_proj"].linears,
        out_features=(module.num_attention_heads * hd, module.num_key_value_heads * hd, module.num_key_value_heads * hd),
    )


class LoraGQAQKVColumnParallelLinear(MultiProjectionLora):
    """LoRA on `GQAQKVColumnParallelLinear` (fused or separate q/k/v weights); forward returns (q, k, v)."""

    def _in_out_features(self, module: GQAQKVColumnParallelLinear) -> tuple[int, int]:
        return module.input_size, sum(self._layout_of(module).out_features)

    @staticmethod
    def _layout_of(module: nn.Module) -> FusedProjections:
        layout = getattr(module, FUSED_LAYOUT_ATTRIBUTE, None)
        return layout if layout is not None else default_qkv_layout(module)

    def _layout(self) -> FusedProjections:
        return self._layout_of(self.get_base_layer())

    def _heads(self, key: str) -> list[int]:
        base = self.get_base_layer()
        return base.query_head_indices if key == "q" else base.kv_head_indices

    def _local_rows(self, key, full):
        hd = self.get_base_layer().head_dim
        heads = full.view(-1, hd, full.shape[1])
        return heads[torch.tensor(self._heads(key), dtype=torch.long)].reshape(-1, full.shape[1]).contiguous()

    def _b_weight(self, key, b):
        base = self.get_base_layer()
        if key == "q" or not base.needs_gradient_reduction or not b.requires_grad:
            return b
        reduce = partial(
            reduce_kv_replica_gradient, head_indices=base._kv_index, num_key_value_heads=base.num_key_value_heads,
            head_dim=base.head_dim, tp=self.tp,
        )  # fmt: skip
        return reduce_replica_gradient_in_backward(b, reduce)

    def _shares_collectives(self) -> bool:
        return True

    def _forward_shared(self, x, adapters):
        base = self.get_base_layer()
        x_full = base.parallel_input(x)  # one gather / gradient reduction for the base and the LoRA branches
        result = base.project(x_full)
        out = dict(zip(QKV, result))
        for adapter in adapters:
            out = self._add_branches(x_full, adapter, out)
        return tuple(out[key].to(r.dtype) for key, r in zip(QKV, result))

    def _deltas(self, adapter_name):
        base = self.get_base_layer()
        deltas = {
            key: self._projection_delta(adapter_name, key)
            for key in QKV
            if f"weight_{key}" in self.lora_A[adapter_name]._parameters
        }
        if not base.fuse_qkv:
            return {f"weight_{key}": delta for key, delta in deltas.items()}
        full = torch.zeros_like(base.weight_qkv)
        offsets = {"q": (0, base.q_size), "k": (base.q_size, base.kv_size), "v": (base.q_size + base.kv_size, base.kv_size)}
        for key, delta in deltas.items():
            start, size = offsets[key]
            full[start : start + size] = delta
        return {"weight_qkv": full}

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        raise ConfigError("LoraGQAQKVColumnParallelLinear has one delta per q/k/v weight; use _deltas()")
