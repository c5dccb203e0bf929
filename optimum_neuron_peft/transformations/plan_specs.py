"""The weight transformation specs of the parallel plan's fused groups (`parallel_plan.FUSED_GROUPS`).

One builder for the model (`models.plan.ParallelPlan`), the checkpoint layout (`checkpoint.tp_layout.plan_layout`)
and `reshard`, so that the three always agree on a group's spec.
"""

from __future__ import annotations

from typing import Any

from .fused_linears import FusedLinearsSpec
from .gqa_qkv import GQAQKVColumnParallelLinearSpec
from .parallel_plan import FUSED_GROUPS, LAYER, MODULE_PLAN, Dims, dims_of


def build_spec(
    fused: str,
    config: Any,
    tp_size: int,
    *,
    kv_size_multiplier: int | None = None,
    fuse_qkv: bool = False,
    kv_layout: str = "tiled",
    mha_fused_qkv: bool = False,
) -> FusedLinearsSpec | GQAQKVColumnParallelLinearSpec:
    """The spec of fused group ``fused`` ("qkv_proj", "gate_up_proj") of ``config`` (a config object, dict or `Dims`).

    A GQA group gets a `GQAQKVColumnParallelLinearSpec` (``kv_size_multiplier`` None: the smallest valid one),
    unless ``mha_fused_qkv`` (every head has its own key/value head): then, like a plain group, a column
    `FusedLinearsSpec` with stride = number of linears, as optimum-neuron does for ``fuse_qkv`` in that case.
    """
    dims = config if isinstance(config, Dims) else dims_of(config)
    group = FUSED_GROUPS[fused]
    plans = [MODULE_PLAN[f"{LAYER}.{group.parent}.{linear}"] for linear in group.linears]
    bias = any(dims.has_bias(p) for p in plans)
    if group.gqa and not mha_fused_qkv:
        q, k, v = group.linears
        return GQAQKVColumnParallelLinearSpec.create(
            num_attention_heads=dims.heads, num_key_value_heads=dims.kv_heads, head_dim=dims.hd, tp_size=tp_size,
            kv_size_multiplier=kv_size_multiplier, fuse_qkv=fuse_qkv, bias=bias, kv_layout=kv_layout,
            gqa_qkv_projection_name=fused, query_projection_name=q, key_projection_name=k, value_projection_name=v,
            output_projection_name=group.output,
        )  # fmt: skip
    out_dims = [dims.shape(p.shape)[0] for p in plans]
    return FusedLinearsSpec(fused, list(group.linears), bias, "column", out_dims, tp_size=tp_size)
