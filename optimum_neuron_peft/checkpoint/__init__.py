"""Checkpoints: our sharded format, optimum-neuron's (read safely, without torch_xla), consolidation into
Transformers / PEFT directories, resharding and verification. See docs/checkpoint_formats.md."""

from .consolidate import ConsolidationResult, consolidate
from .reshard import reshard
from .save import save_sharded_checkpoint, save_sharded_checkpoint_distributed
from .verify import verify

__all__ = [
    "ConsolidationResult",
    "consolidate",
    "reshard",
    "save_sharded_checkpoint",
    "save_sharded_checkpoint_distributed",
    "verify",
]
