"""The parallel layers of the Llama-family models, built from the plan's table (`transformations.parallel_plan`).

All four supported architectures (Llama, Mistral, Qwen3, Granite) share the table (`MODULE_PLAN`); in short:

===========================  ==========================================  =====================================
Transformers module          parallel layer                              parameters (per rank)
===========================  ==========================================  =====================================
model.embed_tokens           ParallelEmbedding (vocab rows)              weight (V/tp, D)
self_attn.{q,k,v}_proj       GQAQKVColumnParallelLinear -> qkv_proj      weight_q/k/v or weight_qkv (spec)
self_attn.o_proj             RowParallelLinear, query-head permuted      weight (D, H*hd/tp) (spec)
mlp.{gate,up}_proj           ColumnParallelLinear, stride 2 -> gate_up   weight [gate_r; up_r] (spec)
mlp.down_proj                RowParallelLinear                           weight (D, I/tp)
lm_head                      ColumnParallelLinear, no gather             weight (V/tp, D), vocab-parallel loss
norms, q_norm / k_norm       replicated                                  full
===========================  ==========================================  =====================================

With sequence parallelism the activations between these layers hold a sequence shard (B, S/tp, D): every
column-parallel layer gathers the sequence, every row-parallel layer / the embedding reduce-scatters it, and the
replicated norm weights are marked so that `allreduce_sequence_parallel_gradients` completes their gradients.

The model code (`modules`, `causal_lm`) asks this object for layers and never chooses a parallel style itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError, SpecError
from ..parallel import (
    ColumnParallelLinear,
    GQAQKVColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    TensorParallel,
)
from ..transformations import FusedLinearsSpec, GQAQKVColumnParallelLinearSpec
from ..transformations.gqa_layout import KV_LAYOUTS, check_gqa_shape, default_kv_size_multiplier
from ..transformations.parallel_plan import COLUMN, FUSED_GROUPS, LAYER, MODULE_PLAN, ROW, dims_of
from ..transformations.plan_specs import build_spec
from .config import ArchitectureConfig


def _no_init(tensor: torch.Tensor) -> None:
    """Leave parameters uninitialized: the checkpoint overwrites them (and on "meta" there is nothing to fill)."""


@dataclass(frozen=True)
class ParallelPlan:
    """Explicit tensor-parallel layout and options; builds every parallel layer of a model."""

    tp: TensorParallel
    sequence_parallel: bool = False
    fuse_qkv: bool = False
    kv_size_multiplier: int | None = None  # None: the smallest valid one
    kv_layout: str = "tiled"
    dtype: torch.dtype | None = None
    device: torch.device | str | None = None
    initialize: bool = True  # False: leave weights empty (they are loaded right after)

    def __post_init__(self) -> None:
        if not isinstance(self.tp, TensorParallel):
            raise ConfigError(f"ParallelPlan.tp must be a TensorParallel, got {type(self.tp).__name__}")
        if self.kv_layout not in KV_LAYOUTS:
            raise ConfigError(f"kv_layout must be one of {KV_LAYOUTS}, got {self.kv_layout!r}")

    @property
    def _factory(self) -> dict:
        return {"dtype": self.dtype, "device": self.device, "tp": self.tp}

    def _init(self) -> dict:
        return {} if self.initialize else {"init_method": _no_init}

    # -- validation -------------------------------------------------------------------------------------------

    def resolved_kv_size_multiplier(self, config: ArchitectureConfig) -> int:
        """The key/value replication factor, checked against the head counts (a `ConfigError` naming the model)."""
        H, K, tp = config.num_attention_heads, config.num_key_value_heads, self.tp.size
        where = f"{config.model_type} (num_attention_heads={H}, num_key_value_heads={K}) at tensor-parallel size {tp}"
        try:
            m = default_kv_size_multiplier(tp, H, K) if self.kv_size_multiplier is None else self.kv_size_multiplier
            check_gqa_shape(tp, H, K, m, where=where)
        except SpecError as e:
            message = str(e)
            raise ConfigError(message if where in message else f"{where}: {message}") from None
        return m

    def check(self, config: ArchitectureConfig) -> None:
        """Every size the plan shards must divide by tp; raise a `ConfigError` naming the setting otherwise."""
        self.resolved_kv_size_multiplier(config)
        tp = self.tp.size
        for name in ("vocab_size", "intermediate_size"):
            value = getattr(config, name)
            if value % tp != 0:
                raise ConfigError(
                    f"{config.model_type}: {name}={value} is not divisible by the tensor-parallel size {tp}; "
                    f"choose a tensor-parallel size that divides it"
                )

    # -- layers -----------------------------------------------------------------------------------------------

    def embedding(self, config: ArchitectureConfig) -> ParallelEmbedding:
        return ParallelEmbedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id,
            sequence_parallel_enabled=self.sequence_parallel, **self._factory, **self._init(),
        )  # fmt: skip

    def qkv_projection(
        self, config: ArchitectureConfig
    ) -> tuple[GQAQKVColumnParallelLinear, GQAQKVColumnParallelLinearSpec]:
        m = self.resolved_kv_size_multiplier(config)
        layer = GQAQKVColumnParallelLinear(
            config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
            kv_size_multiplier=m, bias=config.attention_bias, fuse_qkv=self.fuse_qkv, kv_layout=self.kv_layout,
            sequence_parallel_enabled=self.sequence_parallel, **self._factory, **self._init(),
        )  # fmt: skip
        spec = build_spec(
            "qkv_proj", config, self.tp.size, kv_size_multiplier=m, fuse_qkv=self.fuse_qkv, kv_layout=self.kv_layout
        )
        return layer, spec

    def output_projection(self, config: ArchitectureConfig) -> RowParallelLinear:
        return self.linear(config, f"{LAYER}.self_attn.o_proj")

    def gate_up_projection(self, config: ArchitectureConfig) -> tuple[ColumnParallelLinear, FusedLinearsSpec]:
        # stride 2: rank r holds [gate_r; up_r], the layout of FusedLinearsSpec (docs/checkpoint_formats.md section 2).
        return self.fused_linear(config, "gate_up_proj"), build_spec("gate_up_proj", config, self.tp.size)

    def down_projection(self, config: ArchitectureConfig) -> RowParallelLinear:
        return self.linear(config, f"{LAYER}.mlp.down_proj")

    def lm_head(self, config: ArchitectureConfig) -> ColumnParallelLinear:
        # Vocab-sharded along dim 0 like the embedding, so tied embeddings share one parameter.
        return self.linear(config, "lm_head")

    # -- from the table ---------------------------------------------------------------------------------------

    def linear(self, config: ArchitectureConfig, module: str) -> ColumnParallelLinear | RowParallelLinear:
        """The parallel linear of ``module`` (a `MODULE_PLAN` key) as the table says: column-parallel without
        gathering its output, or row-parallel taking the sharded input; bias when the config gives it one."""
        plan, dims = MODULE_PLAN[module], dims_of(config)
        out_features, in_features = dims.shape(plan.shape)
        common = {"bias": dims.has_bias(plan), "sequence_parallel_enabled": self.sequence_parallel,
                  **self._factory, **self._init()}  # fmt: skip
        if plan.parallel == ROW:
            return RowParallelLinear(in_features, out_features, input_is_parallel=True, **common)
        if plan.parallel != COLUMN:
            raise ConfigError(f"{module} is {plan.parallel}, not a parallel linear")
        return ColumnParallelLinear(in_features, out_features, gather_output=False, **common)

    def fused_linear(self, config: ArchitectureConfig, fused: str) -> ColumnParallelLinear:
        """One column-parallel layer computing the linears of plain fused group ``fused`` (stride = their count)."""
        group, dims = FUSED_GROUPS[fused], dims_of(config)
        plans = [MODULE_PLAN[f"{LAYER}.{group.parent}.{linear}"] for linear in group.linears]
        return ColumnParallelLinear(
            dims.shape(plans[0].shape)[1], sum(dims.shape(p.shape)[0] for p in plans),
            bias=any(dims.has_bias(p) for p in plans), gather_output=False, stride=len(plans),
            sequence_parallel_enabled=self.sequence_parallel, **self._factory, **self._init(),
        )  # fmt: skip
