"""Spec-level rewriting of a LoRA config's ``target_modules`` between original and fused module names.

The adapted set keeps the original projection names next to the fused name (``{"qkv_proj", "q_proj", "v_proj"}``):
PEFT places LoRA on the fused module because its name is there, and the fused LoRA layer creates adapters only for
the projections listed, so partial targets (only q and v) work. The original names match no module of the custom
model, which PEFT accepts as long as some target matches.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import ConfigError
from .names import SUPPORTED_PEFT_TYPES, is_supported_peft_type, peft_type_name


@dataclass(frozen=True)
class FusedProjections:
    """The original projections fused in one layer, in their fused order (a spec's `fused_projections`).

    ``keys`` name the LoRA parameters (``weight_<key>``), ``original_names`` the original modules (same parent),
    ``out_features`` the full size of each along the fuse axis (its outputs for ``fuse_axis`` 0, the column-parallel
    case the fused LoRA layers handle; its inputs for 1).
    """

    keys: tuple[str, ...]
    original_names: tuple[str, ...]
    out_features: tuple[int, ...]
    fuse_axis: int = 0


def prepared(peft_config: Any, inplace: bool, spec_name: str) -> Any:
    if not is_supported_peft_type(peft_config):
        raise ConfigError(
            f"{spec_name}: PEFT type {peft_type_name(peft_config)!r} is not supported; supported PEFT types: "
            f"{', '.join(t.upper() for t in SUPPORTED_PEFT_TYPES)}"
        )
    return peft_config if inplace else copy.deepcopy(peft_config)


def targeted_projections(target_modules: Any, projection_names: Sequence[str]) -> list[str]:
    """The projections of a fused module that an (adapted or original) ``target_modules`` targets, in order."""
    if target_modules == "all-linear":
        return list(projection_names)
    if isinstance(target_modules, str) or target_modules is None:
        return []  # regexes are resolved against the model by adapt_peft_config_for_model
    return [name for name in projection_names if name in target_modules]


def _with(target_modules: Any, add: Sequence[str] = (), remove: Sequence[str] = ()) -> Any:
    kind = type(target_modules)
    items = [m for m in target_modules if m not in remove]
    items += [m for m in add if m not in items]
    return kind(items) if kind in (list, set, tuple) else set(items)


def add_fused_target(target_modules: Any, fused_name: str, projection_names: Sequence[str]) -> Any:
    if target_modules == "all-linear":
        return target_modules  # expanded at model level, where the model's linears are known
    if isinstance(target_modules, str) or target_modules is None:
        return target_modules
    if targeted_projections(target_modules, projection_names):
        return _with(target_modules, add=[fused_name])
    return target_modules


def remove_fused_target(target_modules: Any, fused_name: str, projection_names: Sequence[str]) -> Any:
    if isinstance(target_modules, str) or target_modules is None or fused_name not in target_modules:
        return target_modules
    if targeted_projections(target_modules, projection_names):
        return _with(target_modules, remove=[fused_name])
    # A config adapted by optimum-neuron lists only the fused name: it targeted every projection.
    return _with(target_modules, add=list(projection_names), remove=[fused_name])


class FusedModuleSpec:
    """PEFT-facing methods of a spec that fuses original projections into modules, read from the spec's
    `fused_projections` ({fused module, e.g. ``qkv_proj``: the original projections it replaces, e.g. ``q_proj``,
    ``k_proj``, ``v_proj``}; abstract in `base.ModelWeightTransformationSpec`, so a subclass cannot forget it)."""

    def guess_peft_type(self, model: Any, module_fully_qualified_name: str) -> str | None:
        fused = [model.get_submodule(f"{module_fully_qualified_name}.{name}") for name in self.fused_projections()]
        return "lora" if any(hasattr(module, "lora_A") for module in fused) else None

    def adapt_peft_config(self, peft_config: Any, inplace: bool = False) -> Any:
        config = prepared(peft_config, inplace, type(self).__name__)
        for name, projections in self.fused_projections().items():
            config.target_modules = add_fused_target(config.target_modules, name, projections.original_names)
        return config

    def to_original_peft_config(self, peft_config: Any, inplace: bool = False) -> Any:
        config = prepared(peft_config, inplace, type(self).__name__)
        for name, projections in self.fused_projections().items():
            config.target_modules = remove_fused_target(config.target_modules, name, projections.original_names)
        return config
