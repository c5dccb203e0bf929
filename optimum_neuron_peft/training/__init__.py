"""The training plugin: transformers.Trainer / TrainingArguments for the tensor-parallel models (docs/training.md).

    from optimum_neuron_peft.training import TrainingArguments, Trainer
"""

from .arguments import TrainingArguments
from .trainer import Trainer, build_model

__all__ = ["Trainer", "TrainingArguments", "build_model"]
