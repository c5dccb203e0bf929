"""Writers of Transformers / PEFT weight files (docs/checkpoint_formats.md section 1), fed one tensor at a time.

The whole list of output tensors (name, dtype, shape) is known before any data is read, so the shard split
(`huggingface_hub.split_torch_state_dict_into_shards`'s algorithm, run on the planned sizes) and every safetensors header are fixed
up front; each tensor is then appended to its shard as soon as it is produced. The ``pytorch`` format has no
streaming writer: a ``.bin`` shard is held in memory until complete (bounded by ``max_shard_size``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Literal

from huggingface_hub.serialization._base import parse_size_to_int, split_state_dict_into_shards_factory

from ..errors import CheckpointError
from ..transformations.names import ADAPTER_PICKLE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME
from .stream_writer import SafetensorsStreamWriter, TensorPlan

if TYPE_CHECKING:
    import torch

OutputFormat = Literal["safetensors", "pytorch"]
SAFETENSORS_METADATA = {"format": "pt"}  # what Transformers' save_pretrained writes
_NAMES = {
    ("model", "safetensors"): ("model.safetensors", "model{suffix}.safetensors", "model.safetensors.index.json"),
    ("model", "pytorch"): ("pytorch_model.bin", "pytorch_model{suffix}.bin", "pytorch_model.bin.index.json"),
    ("adapter", "safetensors"): (ADAPTER_WEIGHTS_NAME, None, None),
    ("adapter", "pytorch"): (ADAPTER_PICKLE_WEIGHTS_NAME, None, None),
}


def parse_max_shard_size(value: int | str) -> int:
    try:
        size = value if isinstance(value, int) else parse_size_to_int(str(value))
    except (ValueError, OverflowError):  # OverflowError: '1e400GB' parses to inf
        raise CheckpointError(f"max shard size {value!r} is not a size such as '5GB', '500MB' or an int") from None
    if size <= 0:
        raise CheckpointError(f"max shard size must be positive, got {value!r}")
    return size


def split_into_files(
    plans: dict[str, TensorPlan], kind: Literal["model", "adapter"], format: OutputFormat, max_shard_size: int | str
) -> tuple[dict[str, list[str]], str | None, dict[str, Any] | None]:
    """(file name -> its tensors in order, index file name, index or None when not sharded) of a model / adapter.

    What ``split_torch_state_dict_into_shards`` does with meta tensors (storage size = nbytes, no storage id),
    without creating meta tensors: their first use imports sympy and torch._dynamo (~1.5 s)."""
    single, pattern, index_name = _NAMES[(kind, format)]
    if pattern is None:
        return {single: list(plans)}, index_name, None
    split = split_state_dict_into_shards_factory(
        plans, get_storage_size=lambda p: p.nbytes, filename_pattern=pattern,
        max_shard_size=parse_max_shard_size(max_shard_size),
    )
    files = {name: list(tensors) for name, tensors in split.filename_to_tensors.items()}
    index = {"metadata": dict(split.metadata), "weight_map": dict(split.tensor_to_filename)} if split.is_sharded else None
    return files, index_name, index


def write_index(directory: Path, index_name: str, index: dict[str, Any]) -> None:
    (directory / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


class WeightsWriter:
    """Write planned tensors into ``directory`` as Transformers (``kind="model"``, sharded past ``max_shard_size``)
    or PEFT (``kind="adapter"``, one file) weights. Call `write` in plan order, then `close`."""

    def __init__(
        self,
        directory: str | os.PathLike,
        plans: Iterable[TensorPlan],
        *,
        kind: Literal["model", "adapter"] = "model",
        format: OutputFormat = "safetensors",
        max_shard_size: int | str = "5GB",
    ):
        if format not in ("safetensors", "pytorch"):
            raise CheckpointError(f"output format must be 'safetensors' or 'pytorch', got {format!r}")
        self.directory = Path(directory)
        self.format = format
        self.plans = {p.name: p for p in plans}
        self.files, self.index_name, self.index = split_into_files(self.plans, kind, format, max_shard_size)
        self.file_of = {t: f for f, names in self.files.items() for t in names}
        self._open: dict[str, SafetensorsStreamWriter | dict[str, torch.Tensor]] = {}
        self._remaining = {f: len(names) for f, names in self.files.items()}

    def _writer(self, name: str) -> tuple[str, SafetensorsStreamWriter | dict[str, torch.Tensor]]:
        file = self.file_of.get(name)
        if file is None:
            raise CheckpointError(f"{self.directory}: tensor '{name}' was not planned")
        writer = self._open.get(file)
        if writer is None:
            if self.format == "safetensors":
                writer = SafetensorsStreamWriter(self.directory / file, [self.plans[n] for n in self.files[file]], SAFETENSORS_METADATA)
            else:
                writer = {}
            self._open[file] = writer
        return file, writer

    @property
    def can_copy_ranges(self) -> bool:
        """Whether `copy_ranges` can be used (safetensors output: tensors are byte ranges at known offsets)."""
        return self.format == "safetensors"

    def write(self, name: str, tensor: torch.Tensor) -> None:
        file, writer = self._writer(name)
        if isinstance(writer, dict):
            plan = self.plans[name]
            if tensor.dtype != plan.dtype or tuple(tensor.shape) != plan.shape:
                raise CheckpointError(f"{self.directory / file}: tensor '{name}' differs from its plan")
            writer[name] = tensor.contiguous()
        else:
            writer.write(name, tensor)
        self._done(file, writer)

    def copy_ranges(self, name: str, ranges, copier) -> None:
        """Write tensor ``name`` (dtype and shape as planned) from byte ranges of input files (see `byte_copy`)."""
        file, writer = self._writer(name)
        if isinstance(writer, dict):
            raise CheckpointError(f"{self.directory / file}: the pytorch format cannot be written by byte-range copies")
        plan = self.plans[name]
        writer.copy_ranges(name, plan.dtype, plan.shape, ranges, copier)
        self._done(file, writer)

    def _done(self, file: str, writer) -> None:
        self._remaining[file] -= 1
        if self._remaining[file] == 0:
            if isinstance(writer, dict):
                import torch

                torch.save(writer, self.directory / file)
            else:
                writer.close()
            self._open[file] = None  # type: ignore[assignment]

    def close(self) -> list[Path]:
        unfinished = [f for f, left in self._remaining.items() if left]
        if unfinished:
            for writer in self._open.values():
                if isinstance(writer, SafetensorsStreamWriter):
                    writer.abort()
            raise CheckpointError(f"{self.directory / unfinished[0]}: closed before all its tensors were written")
        if self.index is not None:
            write_index(self.directory, self.index_name, self.index)
        return [self.directory / f for f in self.files]

    def abort(self) -> None:
        for writer in self._open.values():
            if isinstance(writer, SafetensorsStreamWriter):
                writer.abort()
