"""LoRA layers for the tensor-parallel layers, plugged into PEFT through its custom-module dispatch.

The sharding rule, written once (docs/checkpoint_formats.md section 2):

- column-parallel base (output rows sharded): lora_A is replicated, lora_B is sharded like the base rows (dim 0).
  The LoRA branch multiplies the base layer's own `parallel_input` (the sequence all-gathered under sequence
  parallelism, else ``x`` with an all-reduce of its gradient), so one collective serves both, and its backward sums
  the base and LoRA input gradients together. Each rank's LoRA input gradient is then partial (from its rows of B),
  and so is the gradient of the replicated lora_A: it is summed over the group in backward
  (`reduce_gradient_in_backward`, a (r, in) all-reduce in fp32).
- row-parallel base (input columns sharded): lora_A is sharded like the base columns (dim 1). By linearity the
  LoRA partial result x_r A_r^T B^T * scaling is added to the base partial x_r W_r^T BEFORE the base layer's single
  reduction (all-reduce, or reduce-scatter under sequence parallelism); the replicated lora_B's partial gradients
  are summed in backward. The sum is taken in the adapter's dtype (fp32 over a bf16 base).
- vocab-parallel embedding: lora_embedding_A (r, vocab) is sharded along the vocabulary (dim 1), like the base
  rows; lookups outside the rank's range give zeros and the partial results are all-reduced before lora_embedding_B.
  Under sequence parallelism its output keeps this rank's sequence chunk, like the base output.

Gradients of every LoRA parameter are complete on each rank after backward; nothing needs to be called.
``scaling`` is folded into the B matmul and the addition (one addmm).

Initialization never depends on tp: every rank draws the FULL adapter of the original module (PEFT's
distributions, in PEFT's order: A then B) from the same RNG stream, then keeps its shard. Seed before creating the
adapters to get the same adapter at any tp size.

Merging keeps a copy of the base weights it changes, so `unmerge` restores them bit-exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraConfig, LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ..errors import ConfigError
from ..parallel import (
    TP_ATTRIBUTES,
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_gradient_in_backward,
    scatter_to_sequence_parallel_region,
    set_tensor_model_parallel_attributes,
)
from ..transformations.parallel_plan import COLUMN, ROW, VOCAB, lora_partition_dims
from .lora_checks import check_lora_config

# Set on a row-parallel base layer whose local input columns are not a contiguous chunk (o_proj after the GQA
# query-head permutation): a LongTensor of the original columns this rank holds, in order.
INPUT_COLUMNS_ATTRIBUTE = "lora_input_columns"

# -- initialization -------------------------------------------------------------------------------------------


def draw_linear_adapter(in_features: int, out_features: int, r: int, init_lora_weights: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The FULL (A (r, in), B (out, r)) of a linear LoRA, drawn like PEFT's `lora.Linear` (fp32, CPU)."""
    a = torch.empty(r, in_features)
    b = torch.empty(out_features, r)
    if init_lora_weights is False:  # nn.Linear's default init for both
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.kaiming_uniform_(b, a=math.sqrt(5))
    elif init_lora_weights is True:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(b)
    elif str(init_lora_weights).lower() == "gaussian":
        nn.init.normal_(a, std=1 / r)
        nn.init.zeros_(b)
    else:  # check_lora_config refuses the others first
        raise ConfigError(f"init_lora_weights={init_lora_weights!r} is not supported")
    return a, b


def draw_embedding_adapter(num_embeddings: int, embedding_dim: int, r: int, init_lora_weights: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The FULL (A (r, vocab), B (dim, r)) of an embedding LoRA, drawn like PEFT's `lora.Embedding`."""
    a = torch.randn(r, num_embeddings)
    b = torch.randn(embedding_dim, r)
    if init_lora_weights is not False:
        nn.init.zeros_(a)
        nn.init.normal_(b)
    return a, b


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def chunk(tensor: torch.Tensor, dim: int, size: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous chunk of ``size`` entries along ``dim``."""
    return tensor.narrow(dim, rank * size, size).contiguous()


def make_parameter(tensor: torch.Tensor, like: torch.Tensor | None, sharded_dim: int | None, tp_size: int) -> nn.Parameter:
    """A LoRA parameter in the dtype/device of ``like`` (the base weight) with its tensor-parallel attributes."""
    if like is not None:
        tensor = tensor.to(device=like.device, dtype=like.dtype if like.is_floating_point() else None)
    param = nn.Parameter(tensor.contiguous())
    if sharded_dim is None:
        set_tensor_model_parallel_attributes(param, False, 0, 1, 1)
    else:
        set_tensor_model_parallel_attributes(param, True, sharded_dim, 1, tp_size)
    return param


# -- shared base ----------------------------------------------------------------------------------------------


class ParallelLoraLayer(nn.Module, LoraLayer):
    """What every parallel LoRA layer shares: PEFT's custom-module constructor protocol, config checks, dropout and
    scaling bookkeeping, forward dispatch (disabled / merged / active adapters) and exact merge / unmerge.

    Subclasses implement ``_in_out_features``, ``_create_adapter``, ``_lora_forward`` and ``_deltas``.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: float = 1, **kwargs: Any) -> None:  # fmt: skip
        check_lora_config(config)
        nn.Module.__init__(self)
        LoraLayer.__init__(self, base_layer=base_layer, ephemeral_gpu_offload=kwargs.get("ephemeral_gpu_offload", False))
        self.tp = base_layer.tp
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self._merge_backup: dict[str, torch.Tensor] | None = None
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    # PEFT calls this from LoraLayer.__init__; our base layers are not nn.Linear.
    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return self._in_out_features(module)

    def _in_out_features(self, module: nn.Module) -> tuple[int, int]:
        raise NotImplementedError

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig, **kwargs: Any) -> None:
        check_lora_config(config)
        if r <= 0:
            raise ConfigError(f"LoRA rank r must be a positive integer, got {r}")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout[adapter_name] = nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.use_rslora[adapter_name] = config.use_rslora
        self.use_dora[adapter_name] = False
        self.lora_bias[adapter_name] = False
        self.scaling[adapter_name] = lora_scaling(r, lora_alpha, config.use_rslora)
        self._create_adapter(adapter_name, r, lora_alpha, config, kwargs.get("target_name") or "")
        self._record_parallel_attributes()
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # -- tensor-parallel attributes -------------------------------------------------------------------------

    def _record_parallel_attributes(self) -> None:
        """Remember the tensor-parallel attributes of every LoRA parameter, by its name in this layer.

        PEFT replaces adapter parameters by new ones when it casts them (``autocast_adapter_dtype``: bf16/fp16
        adapters become fp32 ``nn.Parameter``s), which drops the attributes; `restore_parallel_attributes` puts
        them back. Without them a row-parallel lora_A looks replicated: loading would not slice it and saving
        would write this rank's shard as the full tensor.
        """
        recorded = getattr(self, "_lora_parallel_attributes", {})
        for name, param in self.named_parameters():
            if name.startswith("base_layer.") or not hasattr(param, "tensor_model_parallel"):
                continue
            recorded.setdefault(name, {attr: getattr(param, attr) for attr in TP_ATTRIBUTES})
        self._lora_parallel_attributes = recorded

    def restore_parallel_attributes(self) -> None:
        """Re-set the recorded tensor-parallel attributes on the current LoRA parameters (see above)."""
        recorded = getattr(self, "_lora_parallel_attributes", {})
        for name, param in self.named_parameters():
            for attr, value in recorded.get(name, {}).items():
                setattr(param, attr, value)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        recorded = getattr(self, "_lora_parallel_attributes", {})
        for name in [n for n in recorded if f".{adapter_name}." in f".{n}."]:
            del recorded[name]

    def _create_adapter(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig, target_name: str) -> None:
        raise NotImplementedError

    # -- forward --------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if kwargs.pop("adapter_names", None) is not None:
            raise ConfigError(f"{type(self).__name__} does not support mixed-adapter batches (adapter_names=...)")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.lora_A or a in self.lora_embedding_A]
        if not self.merged and active and self._shares_collectives():
            return self._forward_shared(x, active)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged or not active:
            return result
        # Like PEFT: the LoRA terms are added in the adapter's dtype (fp32 over a bf16 base), then the sum is cast
        # back to the base output's dtype once.
        out = self._lora_forward(x, result, active)
        return _cast_like(out, result)

    def _lora_forward(self, x: torch.Tensor, result: Any, adapters: list[str]) -> Any:
        raise NotImplementedError

    def _shares_collectives(self) -> bool:
        """Whether `_forward_shared` applies: the base layer and the LoRA branch then share the base layer's
        input collective (column) or output reduction (row) instead of issuing their own."""
        return False

    def _forward_shared(self, x: torch.Tensor, adapters: list[str]) -> Any:
        raise NotImplementedError

    # -- merge ----------------------------------------------------------------------------------------------

    def _deltas(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """{base parameter name: this rank's delta} of one adapter, in the base parameters' local layout."""
        raise NotImplementedError

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        deltas = self._deltas(adapter)
        if set(deltas) != {"weight"}:
            raise ConfigError(f"{type(self).__name__}: the delta spans {sorted(deltas)}; use _deltas()")
        return deltas["weight"]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        for adapter in adapter_names:
            if adapter not in self.lora_A and adapter not in self.lora_embedding_A:
                continue
            deltas = self._deltas(adapter)
            if self._merge_backup is None:  # the base weights before the first merge, for an exact unmerge
                self._merge_backup = {name: getattr(base, name).detach().clone() for name in deltas}
            for name, delta in deltas.items():
                if name not in self._merge_backup:
                    self._merge_backup[name] = getattr(base, name).detach().clone()
                param = getattr(base, name)
                merged = param.data + delta.to(param.dtype)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights; adapter {adapter!r} seems to be broken")
                param.data.copy_(merged)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            return
        base = self.get_base_layer()
        for name, original in (self._merge_backup or {}).items():
            getattr(base, name).data.copy_(original)
        self._merge_backup = None
        self.merged_adapters.clear()

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _cast_like(out: Any, result: Any) -> Any:
    if isinstance(result, tuple):
        return tuple(o.to(r.dtype) for o, r in zip(out, result))
    return out.to(result.dtype)


def add_scaled_matmul(out: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``out + (h @ b^T) * scaling``, with the scaling and the addition folded into one matmul (addmm) when the
    dtypes agree; otherwise (fp32 adapter over a bf16 base) PEFT's promoted add."""
    if out.dtype == h.dtype == b.dtype and out.shape[:-1] == h.shape[:-1]:
        n = out.shape[-1]
        return torch.addmm(out.reshape(-1, n), h.reshape(-1, h.shape[-1]), b.t(), alpha=scaling).view(out.shape)
    return torch.add(out, F.linear(h, b), alpha=scaling)


def _input_for_column(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The full-sequence input a column-parallel LoRA branch sees. The gathered copy feeds a replicated computation
    (lora_A) whose gradient is already complete on every rank, so its backward only splits."""
    if base.sequence_parallel_enabled:
        return gather_from_sequence_parallel_region(x, base.sequence_dim, base.tp, to_model_parallel=False)
    return x


class LoraColumnParallelLinear(ParallelLoraLayer):
    """LoRA on a `ColumnParallelLinear`: lora_A replicated (r, in), lora_B sharded (out/tp, r)."""

    def _in_out_features(self, module: ColumnParallelLinear) -> tuple[int, int]:
        if module.stride != 1:
            raise ConfigError(
                f"LoRA on a ColumnParallelLinear with stride={module.stride} needs its fused linears: target it "
                "through optimum_neuron_peft.peft.get_peft_model (FusedLinearsSpec), not directly"
            )
        return module.input_size, module.output_size

    def _create_adapter(self, adapter_name, r, lora_alpha, config, target_name) -> None:
        base = self.get_base_layer()
        a, b = draw_linear_adapter(self.in_features, self.out_features, r, config.init_lora_weights)
        local_b = chunk(b, 0, base.output_size_per_partition, self.tp.rank)
        a_dim, b_dim = lora_partition_dims(COLUMN)
        self.lora_A[adapter_name] = _linear(make_parameter(a, base.weight, a_dim, self.tp.size))
        self.lora_B[adapter_name] = _linear(make_parameter(local_b, base.weight, b_dim, self.tp.size))

    def _lora_forward(self, x, result, adapters):
        base = self.get_base_layer()
        x = _input_for_column(base, x)
        for adapter in adapters:
            a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
            h = F.linear(self.lora_dropout[adapter](x.to(a.dtype)), a)
            h = copy_to_tensor_parallel_region(h, self.tp)
            y = gather_from_tensor_parallel_region(F.linear(h, b), self.tp)
            result = torch.add(result, y, alpha=self.scaling[adapter])
        return result

    def _shares_collectives(self) -> bool:
        return not self.get_base_layer().gather_output

    def _forward_shared(self, x, adapters):
        """One input collective for the base layer and the LoRA branch: both multiply the base layer's
        `parallel_input`, whose backward reduces (all-reduce, or reduce-scatter under SP) the sum of both input
        gradients. The LoRA branch's share of that gradient is then this rank's partial (from its rows of B), so
        h's gradient is not all-reduced; instead A, replicated, gets its partial gradients summed in backward."""
        base = self.get_base_layer()
        x_full = base.parallel_input(x)
        result = base.project(x_full)
        out = result
        for adapter in adapters:
            a = reduce_gradient_in_backward(self.lora_A[adapter].weight, self.tp)
            h = F.linear(self.lora_dropout[adapter](x_full.to(a.dtype)), a)
            out = add_scaled_matmul(out, h, self.lora_B[adapter].weight, self.scaling[adapter])
        return out.to(result.dtype)

    def _deltas(self, adapter_name):
        return {"weight": (self.lora_B[adapter_name].weight @ self.lora_A[adapter_name].weight) * self.scaling[adapter_name]}


class LoraRowParallelLinear(ParallelLoraLayer):
    """LoRA on a `RowParallelLinear`: lora_A sharded (r, in/tp), lora_B replicated (out, r)."""

    def _in_out_features(self, module: RowParallelLinear) -> tuple[int, int]:
        return module.input_size, module.output_size

    def _create_adapter(self, adapter_name, r, lora_alpha, config, target_name) -> None:
        base = self.get_base_layer()
        a, b = draw_linear_adapter(self.in_features, self.out_features, r, config.init_lora_weights)
        columns = getattr(base, INPUT_COLUMNS_ATTRIBUTE, None)
        if columns is not None:  # o_proj: this rank's query heads, permuted like the base columns
            local_a = a[:, columns].contiguous()
        else:
            local_a = chunk(a, 1, base.input_size_per_partition, self.tp.rank)
        a_dim, b_dim = lora_partition_dims(ROW)
        self.lora_A[adapter_name] = _linear(make_parameter(local_a, base.weight, a_dim, self.tp.size))
        self.lora_B[adapter_name] = _linear(make_parameter(b, base.weight, b_dim, self.tp.size))

    def _shares_collectives(self) -> bool:
        return True

    def _forward_shared(self, x, adapters):
        """The LoRA partial result x_r A_r^T B^T s is added to the base partial x_r W_r^T before the base layer's
        single reduction (sum over ranks of both is the full result, by linearity). B, replicated, then gets a
        partial gradient on each rank, summed in backward (`reduce_gradient_in_backward`); A_r's is complete."""
        base = self.get_base_layer()
        x_local = base.parallel_input(x)
        partial = F.linear(x_local, base.weight)
        for adapter in adapters:
            a = self.lora_A[adapter].weight
            b = reduce_gradient_in_backward(self.lora_B[adapter].weight, self.tp)
            h = F.linear(self.lora_dropout[adapter](x_local.to(a.dtype)), a)
            partial = add_scaled_matmul(partial, h, b, self.scaling[adapter])  # fp32 over a bf16 base: reduced in fp32
        return base.reduce_partial(partial).to(base.weight.dtype)

    def _deltas(self, adapter_name):
        return {"weight": (self.lora_B[adapter_name].weight @ self.lora_A[adapter_name].weight) * self.scaling[adapter_name]}


class LoraParallelEmbedding(ParallelLoraLayer):
    """LoRA on a vocab-parallel `ParallelEmbedding`: lora_embedding_A (r, vocab/tp) sharded, lora_embedding_B
    (dim, r) replicated. Parameter names are PEFT's (``lora_embedding_A.<adapter>``)."""

    def _in_out_features(self, module: ParallelEmbedding) -> tuple[int, int]:
        return module.num_embeddings, module.embedding_dim

    def _create_adapter(self, adapter_name, r, lora_alpha, config, target_name) -> None:
        base = self.get_base_layer()
        a, b = draw_embedding_adapter(self.in_features, self.out_features, r, config.init_lora_weights)
        per_rank = base.vocab_end_index - base.vocab_start_index
        a_dim, b_dim = lora_partition_dims(VOCAB)
        self.lora_embedding_A[adapter_name] = make_parameter(chunk(a, 1, per_rank, self.tp.rank), base.weight, a_dim, self.tp.size)
        self.lora_embedding_B[adapter_name] = make_parameter(b, base.weight, b_dim, self.tp.size)

    def _lora_forward(self, input_ids, result, adapters):
        base = self.get_base_layer()
        if self.tp.is_parallel:
            outside = (input_ids < base.vocab_start_index) | (input_ids >= base.vocab_end_index)
            ids = (input_ids - base.vocab_start_index).masked_fill(outside, 0)
        else:
            outside, ids = None, input_ids
        for adapter in adapters:
            a, b = self.lora_embedding_A[adapter], self.lora_embedding_B[adapter]
            h = F.embedding(ids, a.T, base._local_padding_idx())
            if outside is not None:
                h = h.masked_fill(outside.unsqueeze(-1), 0.0)
            h = reduce_from_tensor_parallel_region(h, self.tp)
            if base.sequence_parallel_enabled:
                # y on the whole sequence, then this rank's chunk: the replicated B gets its full gradient
                y = scatter_to_sequence_parallel_region(F.linear(h, b), base.sequence_dim, self.tp)
                result = torch.add(result, y, alpha=self.scaling[adapter])
            else:
                result = add_scaled_matmul(result, h, b, self.scaling[adapter])
        return result

    def _deltas(self, adapter_name):
        a, b = self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
        return {"weight": (b @ a).T * self.scaling[adapter_name]}


def _linear(weight: nn.Parameter) -> nn.Linear:
    """An nn.Linear without bias holding ``weight`` (keeps PEFT's ``lora_A.<adapter>.weight`` naming)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = weight
    return layer
