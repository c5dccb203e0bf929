"""The tensor-parallel plan of the Llama-family models: which layer is column- or row-parallel, in one place.

All four supported architectures (Llama, Mistral, Qwen3, Granite) share this plan:

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

    def qkv_projection(self, config: ArchitectureConfig) -> tuple[GQAQKVColumnParallelLinear, GQAQKVColumnParallelLinearSpec]:
        m = self.resolved_kv_size_multiplier(config)
        layer = GQAQKVColumnParallelLinear(
            config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
            kv_size_multiplier=m, bias=config.attention_bias, fuse_qkv=self.fuse_qkv, kv_layout=self.kv_layout,
            sequence_parallel_enabled=self.sequence_parallel, **self._factory, **self._init(),
        )  # fmt: skip
        spec = GQAQKVColumnParallelLinearSpec.create(
            num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
            head_dim=config.head_dim, tp_size=self.tp.size, kv_size_multiplier=m, fuse_qkv=self.fuse_qkv,
            bias=config.attention_bias, kv_layout=self.kv_layout, gqa_qkv_projection_name="qkv_proj",
            output_projection_name="o_proj",
        )  # fmt: skip
        return layer, spec

    def output_projection(self, config: ArchitectureConfig) -> RowParallelLinear:
        return RowParallelLinear(
            config.num_attention_heads * config.head_dim, config.hidden_size, bias=config.attention_bias,
            input_is_parallel=True, sequence_parallel_enabled=self.sequence_parallel, **self._factory, **self._init(),
        )  # fmt: skip

    def gate_up_projection(self, config: ArchitectureConfig) -> tuple[ColumnParallelLinear, FusedLinearsSpec]:
        I = config.intermediate_size
        # stride 2: rank r holds [gate_r; up_r], the layout of FusedLinearsSpec (docs/checkpoint_formats.md section 2).
        layer = ColumnParallelLinear(
            config.hidden_size, 2 * I, bias=config.mlp_bias, gather_output=False, stride=2,
            sequence_parallel_enabled=self.sequence_parallel, **self._factory, **self._init(),
        )  # fmt: skip
        spec = FusedLinearsSpec(
            fused_linear_name="gate_up_proj", linear_names=["gate_proj", "up_proj"], bias=config.mlp_bias,
            fuse_axis="column", original_dims=[I, I], tp_size=self.tp.size,
        )  # fmt: skip
        return layer, spec

    def down_projection(self, config: ArchitectureConfig) -> RowParallelLinear:
        return RowParallelLinear(
            config.intermediate_size, config.hidden_size, bias=config.mlp_bias, input_is_parallel=True,
            sequence_parallel_enabled=self.sequence_parallel, **self._factory, **self._init(),
        )  # fmt: skip

    def lm_head(self, config: ArchitectureConfig) -> ColumnParallelLinear:
        # Vocab-sharded along dim 0 like the embedding, so tied embeddings share one parameter.
        return ColumnParallelLinear(
            config.hidden_size, config.vocab_size, bias=False, gather_output=False,
            sequence_parallel_enabled=self.sequence_parallel, **self._factory, **self._init(),
        )  # fmt: skip
