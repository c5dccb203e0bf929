"""optimum-neuron-peft: tensor-parallel LoRA fine-tuning of Llama-family models.

The weight transformation API is importable from the top level; the runtime (`optimum_neuron_peft.parallel`),
models (`.models`), PEFT integration (`.peft`), checkpoints (`.checkpoint`) and merging (`.merge_utils`,
`.merging`) live in their subpackages.
"""

from .transformations import (
    CustomModule,
    FusedLinearsSpec,
    GQAQKVColumnParallelLinearSpec,
    ModelWeightTransformationSpec,
    ModelWeightTransformationSpecs,
    adapt_peft_config_for_model,
    adapt_state_dict,
    create_local_fused_weight,
    create_local_weight_with_padding,
    create_parameter_metadata,
    get_adapter_name,
    get_tensor_model_parallel_attributes,
    is_base_layer,
    remove_adapter_name,
    specialize_transformation_specs_for_model,
    to_original_peft_config_for_model,
    to_original_weights,
)

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
