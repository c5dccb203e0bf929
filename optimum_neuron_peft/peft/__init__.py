"""LoRA for the tensor-parallel models through PEFT's own extension points (see docs/peft.md).

Configs are written with the ORIGINAL Transformers module names; `get_peft_model` / `PeftModel.from_pretrained`
adapt them to the custom model, place our parallel LoRA layers (one adapter per original projection, also inside
fused layers), and save the sharded adapter with its config in original names.
"""

from .config import (
    ALL_LINEAR,
    FUSED_REGEX_MARKER,
    adapt_lora_config,
    adapt_peft_config_for_model,
    annotate_fused_layers,
    fused_layouts,
    lora_layer_mapping,
    to_original_lora_config,
    to_original_peft_config_for_model,
)
from .fused import FusedProjections, LoraFusedColumnParallelLinear, LoraWeights
from .gqa_layer import LoraGQAQKVColumnParallelLinear
from .lora_checks import check_lora_config
from .layers import LoraColumnParallelLinear, LoraParallelEmbedding, LoraRowParallelLinear, ParallelLoraLayer
from .model import (
    PeftModel,
    adapter_metadata,
    consolidate_adapter,
    get_peft_model,
    load_original_adapter_weights,
    local_adapter_state_dict,
    read_vanilla_adapter,
)

__all__ = [
    "ALL_LINEAR",
    "FUSED_REGEX_MARKER",
    "FusedProjections",
    "LoraColumnParallelLinear",
    "LoraFusedColumnParallelLinear",
    "LoraGQAQKVColumnParallelLinear",
    "LoraParallelEmbedding",
    "LoraRowParallelLinear",
    "LoraWeights",
    "ParallelLoraLayer",
    "PeftModel",
    "adapt_lora_config",
    "adapt_peft_config_for_model",
    "adapter_metadata",
    "annotate_fused_layers",
    "check_lora_config",
    "consolidate_adapter",
    "fused_layouts",
    "get_peft_model",
    "load_original_adapter_weights",
    "local_adapter_state_dict",
    "lora_layer_mapping",
    "read_vanilla_adapter",
    "to_original_lora_config",
    "to_original_peft_config_for_model",
]
