"""LoRA on a fused column-parallel layer: one adapter per ORIGINAL projection, as vanilla PEFT would train.

A fused layer (``gate_up_proj`` = gate_proj + up_proj, ``qkv_proj`` = q/k/v) gets, per adapter, a submodule
``lora_A[adapter]`` holding ``weight_<projection>`` (r_p, in), replicated, and ``lora_B[adapter]`` holding
``weight_<projection>`` with this rank's output rows of that projection, only for the projections the config
targets. Each projection has its own rank and alpha, taken from the config's ``rank_pattern`` / ``alpha_pattern``
evaluated on its ORIGINAL module name (``model.layers.0.mlp.gate_proj``), exactly what vanilla PEFT uses.

The branches are computed with one matmul against the concatenated A's (x @ [A_1; A_2; ...]^T), then one small
matmul per projection with its B. optimum-neuron instead shares one lora_A between the fused projections, which
is a different adapter; we never do that.

Which projections a base layer fuses is recorded on it by `annotate_fused_layers` (from the model's specs).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists
from peft.utils.other import get_pattern_key
from torch import nn

from ..errors import ConfigError
from ..parallel import reduce_gradient_in_backward
from ..transformations.parallel_plan import COLUMN, lora_partition_dims
from ..transformations.peft_targets import FusedProjections
from .layers import (
    LoraColumnParallelLinear,
    ParallelLoraLayer,
    add_scaled_matmul,
    chunk,
    draw_linear_adapter,
    lora_scaling,
    make_parameter,
)

FUSED_LAYOUT_ATTRIBUTE = "lora_fused_projections"


class LoraWeights(nn.Module):
    """The LoRA matrices of one adapter of a fused layer, as parameters ``weight_<key>``."""

    def __init__(self, params: dict[str, nn.Parameter]) -> None:
        super().__init__()
        for name, param in params.items():
            self.register_parameter(name, param)

    def forward(self, *args: Any) -> None:  # pragma: no cover - never called
        raise RuntimeError("LoraWeights only holds parameters")


def projection_targets(config: Any, target_name: str, layout: FusedProjections) -> dict[str, tuple[int, float]]:
    """{key: (r, alpha)} of the projections ``config`` targets, judged on their ORIGINAL module names."""
    parent = target_name.rsplit(".", 1)[0] if "." in target_name else ""
    chosen = {}
    for key, original in zip(layout.keys, layout.original_names):
        name = f"{parent}.{original}" if parent else original
        if target_name:
            found = check_target_module_exists(config, name)
            if not found or isinstance(found, _ExcludedModule):
                continue
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha)
        chosen[key] = (r, alpha)
    if not chosen:
        raise ConfigError(
            f"{target_name}: LoRA was placed on this fused layer but the config targets none of its projections "
            f"{list(layout.original_names)}; adapt the config with optimum_neuron_peft.peft.adapt_peft_config_for_model"
        )
    return chosen


class MultiProjectionLora(ParallelLoraLayer):
    """Shared logic of the fused layers; subclasses give the layout, local rows and how outputs are combined."""

    def _layout(self) -> FusedProjections:
        raise NotImplementedError

    def _local_rows(self, key: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full (original-layout) lora_B of projection ``key``."""
        raise NotImplementedError

    def _create_adapter(self, adapter_name, r, lora_alpha, config, target_name) -> None:
        layout = self._layout()
        targets = projection_targets(config, target_name, layout)
        like = self._like()
        a_params, b_params = {}, {}
        a_dim, b_dim = lora_partition_dims(COLUMN)  # the fused layers are column-parallel
        self.projection_scaling = getattr(self, "projection_scaling", {})
        self.projection_r = getattr(self, "projection_r", {})
        for key, out in zip(layout.keys, layout.out_features):
            if key not in targets:
                continue
            r_p, alpha_p = targets[key]
            a, b = draw_linear_adapter(self.in_features, out, r_p, config.init_lora_weights)
            a_params[f"weight_{key}"] = make_parameter(a, like, a_dim, self.tp.size)
            b_params[f"weight_{key}"] = make_parameter(self._local_rows(key, b), like, b_dim, self.tp.size)
        self.lora_A[adapter_name] = LoraWeights(a_params)
        self.lora_B[adapter_name] = LoraWeights(b_params)
        self.projection_r[adapter_name] = {k: targets[k][0] for k in layout.keys if k in targets}
        self.projection_scaling[adapter_name] = {
            k: lora_scaling(*targets[k], config.use_rslora) for k in layout.keys if k in targets
        }
        # r / lora_alpha / scaling of the adapter as PEFT sees it: those of the first projection (informational).
        first = next(iter(self.projection_r[adapter_name]))
        self.r[adapter_name], self.lora_alpha[adapter_name] = targets[first]
        self.scaling[adapter_name] = self.projection_scaling[adapter_name][first]

    def _like(self) -> torch.Tensor | None:
        return next(self.get_base_layer().parameters(), None)

    def _add_branches(self, x: torch.Tensor, adapter: str, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``outputs`` ({key: this rank's output rows of that projection}) plus one adapter's LoRA branches.

        The A factors of all targeted projections sit side by side in one matmul (x @ [A_1; A_2; ...]^T); each B,
        its scaling and the addition are one addmm (`add_scaled_matmul`). Untargeted projections are untouched.
        """
        a_mod, b_mod = self.lora_A[adapter], self.lora_B[adapter]
        names = list(a_mod._parameters)
        a = torch.cat([a_mod._parameters[n] for n in names], dim=0) if len(names) > 1 else a_mod._parameters[names[0]]
        # ``x`` is the base layer's parallel_input (see LoraColumnParallelLinear._forward_shared): the replicated
        # A's partial gradients are summed in backward, one all-reduce for all projections.
        a = reduce_gradient_in_backward(a, self.tp)
        h = F.linear(self.lora_dropout[adapter](x.to(a.dtype)), a)
        ranks = [self.projection_r[adapter][n.removeprefix("weight_")] for n in names]
        outputs = dict(outputs)
        for name, h_p in zip(names, h.split(ranks, dim=-1)):
            key = name.removeprefix("weight_")
            b = self._b_weight(key, b_mod._parameters[name])
            outputs[key] = add_scaled_matmul(outputs[key], h_p, b, self.projection_scaling[adapter][key])
        return outputs

    def _b_weight(self, key: str, b: torch.Tensor) -> torch.Tensor:
        return b

    def _projection_delta(self, adapter: str, key: str) -> torch.Tensor:
        a = self.lora_A[adapter]._parameters[f"weight_{key}"]
        b = self.lora_B[adapter]._parameters[f"weight_{key}"]
        return (b @ a) * self.projection_scaling[adapter][key]

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        getattr(self, "projection_r", {}).pop(adapter_name, None)
        getattr(self, "projection_scaling", {}).pop(adapter_name, None)

    def set_scale(self, adapter: str, scale: float) -> None:
        raise ConfigError(f"{type(self).__name__}: set_scale is not supported on fused layers")


class LoraFusedColumnParallelLinear(MultiProjectionLora):
    """LoRA on a column-parallel layer fusing several linears along the output dim (each rank holds
    [shard_r(W_1); shard_r(W_2); ...]), e.g. ``gate_up_proj``; parameters ``weight_gate_proj`` / ``weight_up_proj``."""

    def _in_out_features(self, module) -> tuple[int, int]:
        layout = getattr(module, FUSED_LAYOUT_ATTRIBUTE)
        if module.gather_output:
            raise ConfigError("LoRA on a fused ColumnParallelLinear needs gather_output=False")
        if sum(layout.out_features) != module.output_size:
            raise ConfigError(
                f"fused projections {layout.original_names} have {sum(layout.out_features)} outputs, the layer "
                f"{module.output_size}"
            )
        return module.input_size, module.output_size

    def _layout(self) -> FusedProjections:
        return getattr(self.get_base_layer(), FUSED_LAYOUT_ATTRIBUTE)

    def _local_sizes(self) -> list[int]:
        return [out // self.tp.size for out in self._layout().out_features]

    def _local_rows(self, key, full):
        index = self._layout().keys.index(key)
        return chunk(full, 0, self._local_sizes()[index], self.tp.rank)

    def _shares_collectives(self) -> bool:
        return True

    def _forward_shared(self, x, adapters):
        base = self.get_base_layer()
        x_full = base.parallel_input(x)
        result = base.project(x_full)
        layout, sizes = self._layout(), self._local_sizes()
        # Per-projection views of the fused output; one concatenation at the end (no zero blocks, no extra add).
        outputs = dict(zip(layout.keys, result.split(sizes, dim=-1)))
        for adapter in adapters:
            outputs = self._add_branches(x_full, adapter, outputs)
        return torch.cat([outputs[key] for key in layout.keys], dim=-1).to(result.dtype)

    def _deltas(self, adapter_name):
        layout, sizes = self._layout(), self._local_sizes()
        base = self.get_base_layer()
        delta = torch.zeros_like(base.weight)
        offset = 0
        for key, size in zip(layout.keys, sizes):
            if f"weight_{key}" in self.lora_A[adapter_name]._parameters:
                delta[offset : offset + size] = self._projection_delta(adapter_name, key)
            offset += size
        return {"weight": delta}


def column_parallel_lora(target: nn.Module, adapter_name: str, config: Any, **kwargs: Any) -> ParallelLoraLayer:
    """PEFT custom-module entry for `ColumnParallelLinear`: fused layers get one adapter per original linear."""
    base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
    if getattr(base, FUSED_LAYOUT_ATTRIBUTE, None) is not None:
        return LoraFusedColumnParallelLinear(target, adapter_name, config=config, **kwargs)
    return LoraColumnParallelLinear(target, adapter_name, config=config, **kwargs)
