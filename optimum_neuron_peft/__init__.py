"""optimum-neuron-peft: tensor-parallel LoRA fine-tuning of Llama-family models.

The weight transformation API (and LoRA-config adaptation) is importable from the top level; the runtime
(`optimum_neuron_peft.parallel`), models (`.models`), PEFT integration (`.peft`), checkpoints (`.checkpoint`) and
merging (`.merge_utils`, `.merging`) live in their subpackages.

The top-level names are resolved on first use (PEP 562): importing the package, or the CLI, does not import torch,
so a command that needs no tensor math (consolidating a full-model checkpoint) starts in a fraction of a second.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from .utils.sharded_writer import register_sharded_writer

__version__ = "0.1.0"

__all__ = [
    "CustomModule",
    "FusedLinearsSpec",
    "GQAQKVColumnParallelLinearSpec",
    "ModelWeightTransformationSpec",
    "ModelWeightTransformationSpecs",
    "adapt_peft_config_for_model",
    "adapt_state_dict",
    "create_local_fused_weight",
    "create_local_weight_with_padding",
    "create_parameter_metadata",
    "get_adapter_name",
    "get_tensor_model_parallel_attributes",
    "is_base_layer",
    "remove_adapter_name",
    "specialize_transformation_specs_for_model",
    "to_original_peft_config_for_model",
    "to_original_weights",
]


# LoRA-config adaptation lives with the PEFT integration; the other top-level names are weight transformations.
_FROM_PEFT = frozenset({"adapt_peft_config_for_model", "to_original_peft_config_for_model"})


def __getattr__(name: str) -> Any:
    if name in __all__:
        module = ".peft.config" if name in _FROM_PEFT else ".transformations"
        value = getattr(importlib.import_module(module, __name__), name)
        globals()[name] = value  # resolved once
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _checkpoint_writer() -> ModuleType:
    from .checkpoint import save

    return save


# `save_pretrained` in models / peft writes through `checkpoint.save`, a layer above them: the root wires it in.
register_sharded_writer(_checkpoint_writer)
