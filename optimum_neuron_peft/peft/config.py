"""LoRA configs written with ORIGINAL Transformers module names, adapted to a tensor-parallel custom model and back.

Users write ``LoraConfig(target_modules=["q_proj", "v_proj"], rank_pattern={...})`` as for vanilla PEFT. In the
custom model q/k/v live in one ``qkv_proj`` and gate/up in one ``gate_up_proj``, so adaptation:

- checks the config at once (LORA only, no DoRA, no lora_bias, supported inits, no modules_to_save on sharded or
  fused modules) and that its targets match some module of the ORIGINAL model, with a `ConfigError` otherwise;
- adds the fused modules to ``target_modules`` so PEFT places a LoRA layer on them, keeping every original entry so
  the fused LoRA layer can tell which of its projections are targeted (judged on the original module names, with
  PEFT's own matching, ``layers_to_transform`` and ``exclude_modules`` included):
    * list / set: the spec-level rewriting (``{"qkv_proj", "q_proj", "v_proj"}``), plus the full name of any fused
      module whose projections are targeted only through full names;
    * regex string: ``(?:<regex>)|(?#optimum-neuron-peft:fused)(?:<fused module names>)``;
    * ``"all-linear"``: every original linear except the output layer, by name, plus the fused names and the
      marker entry ``"all-linear"`` (it matches no module) so the config can be restored;
- keeps ``rank_pattern`` / ``alpha_pattern`` unchanged: keys are original names; the fused LoRA layers evaluate them
  on the original name of each projection, the other layers keep their original names anyway;
- registers our LoRA layers with PEFT (``LoraConfig._register_custom_module``) and records on each fused base layer
  which original projections it holds.

`to_original_lora_config` undoes all of it: ``to_original(adapt(c)) == c``.
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import Any

from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists
import torch
from torch import nn

from ..errors import ConfigError
from ..parallel import ColumnParallelLinear, GQAQKVColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from ..transformations.base import CustomModule
from ..transformations.names import SUPPORTED_PEFT_TYPES, is_supported_peft_type, peft_type_name
from .fused import FUSED_LAYOUT_ATTRIBUTE, FusedProjections, column_parallel_lora
from .gqa_layer import LoraGQAQKVColumnParallelLinear
from .layers import INPUT_COLUMNS_ATTRIBUTE, LoraParallelEmbedding, LoraRowParallelLinear
from .lora_checks import check_lora_config

ALL_LINEAR = "all-linear"
FUSED_REGEX_MARKER = "(?#optimum-neuron-peft:fused)"


# -- what the custom model corresponds to ---------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """The custom model inside a PeftModel / LoraModel (module names then match the original model)."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, PeftModel):
        model = model.base_model
    if isinstance(model, BaseTuner):
        model = model.model
    return model


def fused_layouts(model: nn.Module) -> dict[str, FusedProjections]:
    """{fused module name: its original projections} from the specs of the model's custom modules."""
    layouts = {}
    for name, module in unwrap_model(model).named_modules():
        if not isinstance(module, CustomModule):
            continue
        prefix = f"{name}." if name else ""
        for spec in module.specs:
            for fused, projections in spec.fused_projections().items():
                if projections.fuse_axis != 0:
                    raise ConfigError(f"{prefix}{fused}: LoRA on row-fused linears is not supported")
                layouts[prefix + fused] = projections
    return layouts


ADAPTABLE_TYPES = (ColumnParallelLinear, RowParallelLinear, GQAQKVColumnParallelLinear, ParallelEmbedding)


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def original_modules(model: nn.Module) -> dict[str, tuple[str, bool]]:
    """{original module name: (custom module name, is a linear)} for every module LoRA can target."""
    inner = unwrap_model(model)
    layouts = fused_layouts(inner)
    from peft.tuners.tuners_utils import BaseTunerLayer

    out: dict[str, tuple[str, bool]] = {}
    lora_prefixes = [f"{n}." for n, m in inner.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, module in inner.named_modules():
        if any(name.startswith(prefix) for prefix in lora_prefixes):
            continue  # base_layer, lora_A... inside an existing LoRA layer
        base = _base(module)
        if not isinstance(base, ADAPTABLE_TYPES + (nn.Linear, nn.Embedding)):
            continue
        if name in layouts:
            parent = name.rsplit(".", 1)[0]
            for original in layouts[name].original_names:
                out[f"{parent}.{original}"] = (name, True)
        else:
            out[name] = (name, not isinstance(base, (ParallelEmbedding, nn.Embedding)))
    return out


def _output_layer_name(model: nn.Module) -> str | None:
    inner = unwrap_model(model)
    get = getattr(inner, "get_output_embeddings", None)
    output = get() if callable(get) else None
    if output is None:
        return "lm_head" if hasattr(inner, "lm_head") else None
    for name, module in inner.named_modules():
        if module is output or _base(module) is output:
            return name
    return None


def _matches(config: Any, key: str) -> bool:
    found = check_target_module_exists(config, key)
    return bool(found) and not isinstance(found, _ExcludedModule)


# -- adaptation -------------------------------------------------------------------------------------------------


def adapt_lora_config(model: nn.Module, config: Any, inplace: bool = False) -> Any:
    """One LoRA config in original names -> the config for the custom ``model`` (see module doc)."""
    check_lora_config(config)
    adapted = config if inplace else copy.deepcopy(config)
    layouts = fused_layouts(model)
    originals = original_modules(model)
    annotate_fused_layers(model, layouts)

    target = adapted.target_modules
    if target is None:
        raise ConfigError(
            "target_modules is not set; name the original modules to adapt, e.g. target_modules=['q_proj', 'v_proj'] "
            "or 'all-linear'"
        )
    if isinstance(target, str) and target.lower() == ALL_LINEAR:
        output = _output_layer_name(model)
        names = sorted({n.rsplit(".", 1)[-1] for n, (_, linear) in originals.items() if linear and n != output})
        adapted.target_modules = set(names) | {ALL_LINEAR}
    _check_modules_to_save(adapted, originals, layouts)
    targeted = [name for name in originals if _matches(adapted, name)]
    if not targeted:
        available = sorted({n.rsplit(".", 1)[-1] for n in originals})
        raise ConfigError(
            f"target_modules={_show(config.target_modules)} match no module of the model (layers_to_transform="
            f"{config.layers_to_transform}); modules LoRA can target (original names): {available}"
        )
    _warn_unmatched_patterns(adapted, targeted)
    fused_targeted = sorted({originals[name][0] for name in targeted if originals[name][0] in layouts})
    adapted.target_modules = _with_fused_targets(adapted, fused_targeted, layouts)
    _check_fused_coverage(adapted, layouts)
    adapted._register_custom_module(lora_layer_mapping())
    return adapted


def _warn_unmatched_patterns(config: Any, targeted: list[str]) -> None:
    """PEFT's warning for rank/alpha pattern keys that match no targeted module, judged on ORIGINAL names."""
    for attr in ("rank_pattern", "alpha_pattern"):
        keys = getattr(config, attr, None) or {}
        unmatched = sorted(k for k in keys if not any(re.match(rf"(.*\.)?({k})$", name) for name in targeted))
        if unmatched:
            warnings.warn(f"{attr} keys {unmatched} match no targeted module and are ignored", RuntimeWarning)


def _show(target: Any) -> Any:
    return sorted(target) if isinstance(target, (set, frozenset)) else target


def _with_fused_targets(config: Any, fused: list[str], layouts: dict) -> Any:
    target = config.target_modules
    if isinstance(target, str):
        if not fused:
            return target
        names = "|".join(re.escape(name) for name in fused)
        return f"(?:{target})|{FUSED_REGEX_MARKER}(?:{names})"
    items = list(target)
    for name in fused:
        bare = name.rsplit(".", 1)[-1]
        projections = layouts[name].original_names
        # The spec-level form: the bare fused name when the projections are listed by bare name.
        if any(p in items for p in projections) and bare not in items:
            items.append(bare)
        probe = copy.copy(config)
        probe.target_modules = type(target)(items) if isinstance(target, (list, set)) else set(items)
        if not _matches(probe, name):
            items.append(name)
    return type(target)(items) if isinstance(target, (list, set, tuple)) else set(items)


def _check_fused_coverage(config: Any, layouts: dict) -> None:
    """Every fused module PEFT will wrap must have a targeted projection (else the fused LoRA layer is empty)."""
    for name, layout in layouts.items():
        if not _matches(config, name):
            continue
        parent = name.rsplit(".", 1)[0]
        if not any(_matches(config, f"{parent}.{p}") for p in layout.original_names):
            raise ConfigError(
                f"{name}: target_modules select this fused module but none of its projections "
                f"{list(layout.original_names)} (check exclude_modules / the regex); target a projection or none"
            )


def _check_modules_to_save(config: Any, originals: dict, layouts: dict) -> None:
    modules = getattr(config, "modules_to_save", None) or []
    sharded = set(layouts) | {custom for custom, _ in originals.values()}
    fused_projections = {p for layout in layouts.values() for p in layout.original_names}
    for entry in modules:
        if entry in fused_projections:
            raise ConfigError(
                f"modules_to_save={entry!r}: this module is fused in the tensor-parallel model and cannot be saved "
                "on its own; target it with LoRA instead"
            )
        for name, (custom, _) in originals.items():
            if (name == entry or name.endswith(f".{entry}")) and custom in sharded:
                raise ConfigError(
                    f"modules_to_save={entry!r}: {name} is a tensor-parallel (sharded) layer; a full trainable copy "
                    "of it is not supported. Target it with LoRA instead, or save only replicated modules (norms)"
                )


def to_original_lora_config(model: nn.Module, config: Any, inplace: bool = False) -> Any:
    """Inverse of `adapt_lora_config`."""
    if not is_supported_peft_type(config):
        raise ConfigError(
            f"PEFT type {peft_type_name(config)!r} is not supported; supported PEFT types: "
            f"{', '.join(t.upper() for t in SUPPORTED_PEFT_TYPES)}"
        )
    restored = config if inplace else copy.deepcopy(config)
    layouts = fused_layouts(model)
    target = restored.target_modules
    if isinstance(target, str):
        if FUSED_REGEX_MARKER in target:
            head = target.split(f"|{FUSED_REGEX_MARKER}", 1)[0]
            restored.target_modules = head[3:-1] if head.startswith("(?:") and head.endswith(")") else head
    elif target is not None:
        items = list(target)
        if ALL_LINEAR in items:
            restored.target_modules = ALL_LINEAR
        else:
            for name, layout in layouts.items():
                bare = name.rsplit(".", 1)[-1]
                listed = [p for p in layout.original_names if p in items]
                parent = name.rsplit(".", 1)[0]
                if name in items:
                    items.remove(name)
                    if not listed and not any(f"{parent}.{p}" in items for p in layout.original_names):
                        items += [f"{parent}.{p}" for p in layout.original_names]  # optimum-neuron style
                if bare in items:
                    items.remove(bare)
                    if not listed:
                        items += list(layout.original_names)
            restored.target_modules = type(target)(items) if isinstance(target, (list, set, tuple)) else set(items)
    if hasattr(restored, "_custom_modules"):
        restored._custom_modules = None
    return restored


def adapt_peft_config_for_model(model: nn.Module, peft_config: Any, inplace: bool = False) -> Any:
    """Rewrite a LoRA config (or {adapter name: config}) written with original module names for the custom model.

    Regexes, ``"all-linear"``, partial targets of fused modules, ``layers_to_transform``, rank / alpha patterns and
    ``modules_to_save`` are handled against the model (`adapt_lora_config`); the result also registers
    our parallel LoRA layers with PEFT. Raises `ConfigError` for configs that cannot work (nothing targeted,
    unsupported PEFT type, DoRA...).
    """
    return _each_config(model, peft_config, adapt_lora_config, inplace)


def to_original_peft_config_for_model(model: nn.Module, peft_config: Any, inplace: bool = False) -> Any:
    """Inverse of `adapt_peft_config_for_model`: ``to_original(adapt(c)) == c``."""
    return _each_config(model, peft_config, to_original_lora_config, inplace)


def _each_config(model: nn.Module, peft_config: Any, convert: Any, inplace: bool) -> Any:
    """``convert`` applied to one config, or to each of a {adapter name: config} dict (copied unless ``inplace``)."""
    configs = peft_config if inplace else copy.deepcopy(peft_config)
    if isinstance(configs, dict):
        for name, config in configs.items():
            configs[name] = convert(model, config, inplace=True)
        return configs
    return convert(model, configs, inplace=True)


def annotate_fused_layers(model: nn.Module, layouts: dict | None = None) -> None:
    """Record on each fused base layer the original projections it holds (read by the fused LoRA layers)."""
    inner = unwrap_model(model)
    for name, layout in (fused_layouts(inner) if layouts is None else layouts).items():
        setattr(_base(inner.get_submodule(name)), FUSED_LAYOUT_ATTRIBUTE, layout)
    # o_proj holds the columns of the rank's (permuted) query heads: row-parallel LoRA init must take the same ones.
    for name, module in inner.named_modules():
        if not isinstance(module, CustomModule):
            continue
        for spec in module.specs:
            for row_parallel, gqa in spec.permuted_input_modules().items():
                qkv = _base(module.get_submodule(gqa))
                output = _base(module.get_submodule(row_parallel))
                hd = qkv.head_dim
                columns = [h * hd + i for h in qkv.query_head_indices for i in range(hd)]
                setattr(output, INPUT_COLUMNS_ATTRIBUTE, torch.tensor(columns, dtype=torch.long))


def lora_layer_mapping() -> dict[type, Any]:
    """PEFT custom-module mapping: base layer type -> LoRA layer (or factory)."""
    return {
        GQAQKVColumnParallelLinear: LoraGQAQKVColumnParallelLinear,
        ColumnParallelLinear: column_parallel_lora,
        RowParallelLinear: LoraRowParallelLinear,
        ParallelEmbedding: LoraParallelEmbedding,
    }
