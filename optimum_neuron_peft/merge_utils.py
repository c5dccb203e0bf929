"""PEFT-compatible task-tensor merging kernels: the same functions, signatures and results as
``peft.utils.merge_utils``. The public name of `optimum_neuron_peft.merging.kernels` (see its doc for how they are
computed and the one deviation).
"""

from .merging.kernels import (
    calculate_majority_sign_mask,
    dare_linear,
    dare_ties,
    disjoint_merge,
    magnitude_based_pruning,
    magnitude_prune,
    prune,
    random_pruning,
    reshape_weight_task_tensors,
    task_arithmetic,
    ties,
)

__all__ = [
    "reshape_weight_task_tensors",
    "magnitude_based_pruning",
    "random_pruning",
    "prune",
    "calculate_majority_sign_mask",
    "disjoint_merge",
    "task_arithmetic",
    "magnitude_prune",
    "ties",
    "dare_linear",
    "dare_ties",
]
