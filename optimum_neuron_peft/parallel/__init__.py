"""Tensor-parallel runtime: process groups, autograd collectives, parallel layers, vocab-parallel loss, launcher.

Runs on any torch.distributed backend (gloo on CPU, nccl on GPU, the XLA backend on Trainium) and needs no process
group at tp = 1. Nothing here imports torch_xla or neuronx-distributed. See docs/parallel.md.
"""

from .attributes import (
    TP_ATTRIBUTES,
    allreduce_sequence_parallel_gradients,
    copy_tensor_model_parallel_attributes,
    is_tensor_model_parallel,
    mark_sequence_parallel,
    reduce_gradient_in_backward,
    set_tensor_model_parallel_attributes,
)
from .gqa import GQAQKVColumnParallelLinear, reduce_kv_replica_gradient, reduce_replica_gradient_in_backward
from .launch import WorkerError, init_distributed_from_env, spawn
from .layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from .loss import parallel_cross_entropy
from .mappings import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)
from .state import (
    TensorParallel,
    destroy_model_parallel,
    get_data_parallel_group,
    get_data_parallel_rank,
    get_data_parallel_size,
    get_pipeline_model_parallel_rank,
    get_pipeline_model_parallel_size,
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_size,
    initialize_model_parallel,
    model_parallel_is_initialized,
)

__all__ = [
    "TP_ATTRIBUTES",
    "ColumnParallelLinear",
    "GQAQKVColumnParallelLinear",
    "ParallelEmbedding",
    "RowParallelLinear",
    "TensorParallel",
    "WorkerError",
    "allreduce_sequence_parallel_gradients",
    "copy_tensor_model_parallel_attributes",
    "copy_to_tensor_parallel_region",
    "destroy_model_parallel",
    "gather_from_sequence_parallel_region",
    "gather_from_tensor_parallel_region",
    "get_data_parallel_group",
    "get_data_parallel_rank",
    "get_data_parallel_size",
    "get_pipeline_model_parallel_rank",
    "get_pipeline_model_parallel_size",
    "get_tensor_model_parallel_group",
    "get_tensor_model_parallel_rank",
    "get_tensor_model_parallel_size",
    "init_distributed_from_env",
    "initialize_model_parallel",
    "is_tensor_model_parallel",
    "mark_sequence_parallel",
    "model_parallel_is_initialized",
    "parallel_cross_entropy",
    "reduce_from_tensor_parallel_region",
    "reduce_gradient_in_backward",
    "reduce_kv_replica_gradient",
    "reduce_replica_gradient_in_backward",
    "reduce_scatter_to_sequence_parallel_region",
    "scatter_to_sequence_parallel_region",
    "scatter_to_tensor_parallel_region",
    "set_tensor_model_parallel_attributes",
    "spawn",
]
