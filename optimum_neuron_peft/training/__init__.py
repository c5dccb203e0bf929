"""The training plugin: transformers.Trainer / TrainingArguments for the tensor-parallel models (docs/training.md).

    from optimum_neuron_peft.training import TrainingArguments, Trainer, SFTConfig, SFTTrainer
"""

from .arguments import TrainingArguments
from .sft import SFTConfig, SFTTrainer
from .trainer import Trainer, build_model

__all__ = ["SFTConfig", "SFTTrainer", "Trainer", "TrainingArguments", "build_model"]
