"""Weight transformation specs: original Transformers weights <-> tensor-parallel weights of custom modules."""

from .base import (
    SPEC_REGISTRY,
    CustomModule,
    ModelWeightTransformationSpec,
    ModelWeightTransformationSpecs,
    register_spec,
    spec_class_from_name,
)
from .fused_linears import FusedLinearsSpec
from .gqa_layout import (
    check_gqa_shape,
    default_kv_size_multiplier,
    kv_head_indices_for_rank,
    query_head_indices_for_rank,
    valid_kv_size_multipliers,
)
from .gqa_qkv import GQAQKVColumnParallelLinearSpec, compute_query_indices_for_rank
from .metadata import (
    create_parameter_metadata,
    get_tensor_model_parallel_attributes,
    metadata_from_json,
    metadata_to_json,
    parse_metadata,
)
from .model import (
    adapt_peft_config_for_model,
    adapt_state_dict,
    normalize_parameters_metadata,
    specialize_transformation_specs_for_model,
    to_original_peft_config_for_model,
    to_original_weights,
)
from .names import get_adapter_name, is_base_layer, remove_adapter_name
from .sharding import (
    create_local_fused_weight,
    create_local_weight_with_padding,
    shard_tensor,
    unshard_tensors,
)
