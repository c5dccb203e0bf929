"""Weight transformation specs: original Transformers weights <-> tensor-parallel weights of custom modules.

The names below are resolved on first use (PEP 562): the pure-Python submodules (`gqa_layout`, `names`) can be
imported without importing torch, which the torch-free consolidation path relies on.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule defining it
_EXPORTS = {
    **dict.fromkeys(
        ["SPEC_REGISTRY", "CustomModule", "ModelWeightTransformationSpec", "ModelWeightTransformationSpecs",
         "register_spec", "spec_class_from_name"], ".base"),
    "FusedLinearsSpec": ".fused_linears",
    **dict.fromkeys(
        ["check_gqa_shape", "default_kv_size_multiplier", "kv_head_indices_for_rank", "query_head_indices_for_rank",
         "valid_kv_size_multipliers"], ".gqa_layout"),
    **dict.fromkeys(["GQAQKVColumnParallelLinearSpec", "compute_query_indices_for_rank"], ".gqa_qkv"),
    **dict.fromkeys(
        ["create_parameter_metadata", "get_tensor_model_parallel_attributes", "metadata_from_json", "metadata_to_json",
         "parse_metadata"], ".metadata"),
    **dict.fromkeys(
        ["adapt_state_dict", "normalize_parameters_metadata", "specialize_transformation_specs_for_model",
         "to_original_weights"],
        ".model"),
    **dict.fromkeys(["get_adapter_name", "is_base_layer", "remove_adapter_name"], ".names"),
    **dict.fromkeys(
        ["create_local_fused_weight", "create_local_weight_with_padding", "shard_tensor", "unshard_tensors"],
        ".sharding"),
}  # fmt: skip

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    imported = importlib.import_module(module, __name__)
    if module == ".base":
        imported.load_builtin_specs()  # SPEC_REGISTRY complete, as when this package imported everything
    value = getattr(imported, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
