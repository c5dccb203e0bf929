"""Which of the two sharded formats a checkpoint directory holds, and opening it (files discovered and checked,
no tensor read). Torch-free."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError
from .optimum_neuron import OptimumNeuronCheckpoint
from .native_format import ShardedCheckpoint, is_sharded_checkpoint

Checkpoint = ShardedCheckpoint | OptimumNeuronCheckpoint


def open_checkpoint(path: str | os.PathLike, *, check_checksums: bool = False) -> Checkpoint:
    """Our format when ``path/manifest.json`` exists, else optimum-neuron's. One-line `CheckpointError` otherwise."""
    root = Path(path)
    if root.is_dir() and not any(root.iterdir()):
        raise CheckpointError(f"{root}: expected a sharded checkpoint, found an empty directory")
    if is_sharded_checkpoint(root):
        return ShardedCheckpoint.open(root, check_checksums=check_checksums)
    return OptimumNeuronCheckpoint.discover(root)


def source_format_of(checkpoint: Checkpoint) -> str:
    return "optimum-neuron-peft" if isinstance(checkpoint, ShardedCheckpoint) else "optimum-neuron"
