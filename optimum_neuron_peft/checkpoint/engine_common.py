"""What the two consolidation engines share: argument checks, the test hook, copying root files, the result.

`consolidate` picks the torch-free engine (`torch_free`) or the torch engine (`torch_engine`) and checks the arguments
here first, with the same messages for both; both return a `ConsolidationResult`. Torch-free.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import CheckpointError
from ..utils.atomic import check_output_dir
from .hf_output import parse_max_shard_size

# Test hook: seconds to sleep after each group, so a test can kill a consolidation half-way.
SLEEP_ENV = "OPTIMUM_NEURON_PEFT_TEST_SLEEP_PER_GROUP"
FORMATS = ("safetensors", "pytorch")


@dataclass(frozen=True)
class ConsolidateOptions:
    """The options of `consolidate.consolidate` that both engines read (the CLI builds them without torch)."""

    format: str = "safetensors"
    max_shard_size: int | str = "5GB"
    adapter: str | None = None
    dtype: Any = None  # a torch dtype or its name; only the torch engine casts
    overwrite: bool = False
    verify: bool = False
    check_checksums: bool = False
    progress: bool = False


@dataclass
class ConsolidationResult:
    output_dir: Path
    tensors: int
    bytes: int
    seconds: float
    directories: dict[str, Path] = field(default_factory=dict)  # "model" / adapter name -> directory
    engine: str = "torch"  # "torch-free" when written by byte copies without importing torch (`torch_free`)
    reason: str | None = None  # why the torch engine took it (`consolidate.choose_engine`)

    def summary(self) -> str:
        rate = self.bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")
        which = "torch-free engine" if self.engine == "torch-free" else f"torch engine: {self.reason or 'asked for'}"
        return (
            f"consolidated {self.tensors} tensors, {self.bytes / 1e9:.3f} GB in {self.seconds:.2f} s "
            f"({rate:.2f} GB/s) -> {self.output_dir} [{which}]"
        )


def check_arguments(checkpoint_dir: Path, output_dir: Path, *, format: Any, max_shard_size: Any, overwrite: bool) -> None:
    """The checks both engines make before reading anything (dtype names are checked by the torch engine)."""
    check_output_dir(output_dir, overwrite, inputs=[checkpoint_dir])
    if format not in FORMATS:
        raise CheckpointError(f"output format must be 'safetensors' or 'pytorch', got {format!r}")
    parse_max_shard_size(max_shard_size)


def copy_root_files(paths: Iterable[Path | None], directory: Path) -> None:
    """config.json, tokenizer and generation files of the checkpoint, next to the model weights."""
    for path in paths:
        if path is not None:
            shutil.copyfile(path, directory / Path(path).name)
