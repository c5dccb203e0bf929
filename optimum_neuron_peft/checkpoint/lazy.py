"""Lazy handles on tensors stored inside files, and a header-only safetensors reader.

A :class:`LazyTensor` records where a tensor's bytes live (file, byte offset, dtype, shape, strides) and reads them
only when :meth:`LazyTensor.load` is called. Reading goes through ``readinto`` into a freshly allocated tensor, so the
returned tensor owns its memory and nothing (no mmap, no whole-file buffer) stays alive after it is freed: this is
what lets the consolidation engine bound its memory to the tensors it holds at one time.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

# A read of more than 2 GiB is split by the kernel anyway; asking for at most this much per call keeps the loop simple.
_MAX_READ = 1 << 30


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides of ``shape`` (what ``torch.empty(shape).stride()`` returns)."""
    strides = []
    step = 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


@dataclass(frozen=True, slots=True)
class LazyTensor:
    """Where one tensor lives in a file; :meth:`load` reads it.

    ``offset`` is the absolute byte offset in ``file`` of element 0 of the tensor's *storage*, ``storage_nbytes`` the
    size of that storage, and ``storage_offset``/``stride`` (in elements, as in ``torch.Tensor.as_strided``) locate the
    tensor inside it. ``torch.save`` of a view stores the whole underlying storage, hence these fields.

    ``slots=True`` and ``frozen=True`` are deliberate: a hostile pickle cannot rewrite the fields of an instance
    (pickle's BUILD opcode needs a ``__dict__`` or a writable attribute) to point it at another file.
    """

    name: str
    shape: torch.Size
    dtype: torch.dtype
    file: Path
    offset: int
    storage_nbytes: int
    storage_offset: int = 0
    stride: tuple[int, ...] | None = None  # None: row-major contiguous

    def __post_init__(self) -> None:
        # Validate once, at open time, so that a bad file fails before any consolidation work starts.
        object.__setattr__(self, "shape", torch.Size(self.shape))
        object.__setattr__(self, "file", Path(self.file))
        stride = contiguous_strides(tuple(self.shape)) if self.stride is None else tuple(self.stride)
        if len(stride) != len(self.shape) or any(s < 0 for s in stride) or any(d < 0 for d in self.shape):
            raise CheckpointError(
                f"{self.file}: tensor '{self.name}' has an invalid layout; expected non-negative sizes and one "
                f"non-negative stride per dim, found shape {tuple(self.shape)} stride {stride}"
            )
        if self.storage_offset < 0 or self.offset < 0:
            raise CheckpointError(f"{self.file}: tensor '{self.name}' has a negative offset")
        first, count = self._span()
        end = (first + count) * self.itemsize
        if count and end > self.storage_nbytes:
            raise CheckpointError(
                f"{self.file}: tensor '{self.name}' needs {end} bytes of its storage, found only "
                f"{self.storage_nbytes} (truncated or corrupted storage)"
            )

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the loaded (contiguous) tensor."""
        return self.numel * self.itemsize

    @property
    def read_nbytes(self) -> int:
        """Bytes read from disk by :meth:`load` (more than ``nbytes`` for a strided view with gaps)."""
        return self._span()[1] * self.itemsize

    def _strides(self) -> tuple[int, ...]:
        return contiguous_strides(tuple(self.shape)) if self.stride is None else tuple(self.stride)

    def _span(self) -> tuple[int, int]:
        """(first element, element count) of the storage region the tensor touches."""
        if self.numel == 0:
            return self.storage_offset, 0
        last = self.storage_offset + sum((size - 1) * step for size, step in zip(self.shape, self._strides()))
        return self.storage_offset, last - self.storage_offset + 1

    def is_dense(self) -> bool:
        """True when the span read from disk is exactly the tensor in row-major order (no copy needed)."""
        shape = tuple(self.shape)
        strides = self._strides()
        return all(size == 1 or step == want for size, step, want in zip(shape, strides, contiguous_strides(shape)))

    def load(self) -> torch.Tensor:
        """Read the tensor: a fresh, contiguous CPU tensor that owns its memory."""
        first, count = self._span()
        if count == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        buffer = torch.empty(count, dtype=self.dtype)
        read_exact_into(self.file, self.offset + first * self.itemsize, buffer)
        if self.is_dense():
            return buffer.view(self.shape)
        # Gaps or a transposed layout: read the span once, then copy the view out so the span buffer can be freed.
        view = torch.as_strided(buffer, self.shape, self._strides())
        return view.clone(memory_format=torch.contiguous_format)

    def __repr__(self) -> str:
        return f"LazyTensor(name={self.name!r}, shape={tuple(self.shape)}, dtype={self.dtype}, file={str(self.file)!r})"


def read_exact_into(path: Path, offset: int, tensor: torch.Tensor) -> None:
    """Fill the contiguous CPU ``tensor`` with ``tensor.nbytes`` bytes of ``path`` read from ``offset``."""
    view = memoryview(tensor.view(-1).view(torch.uint8).numpy()).cast("B")
    total = len(view)
    done = 0
    with open(path, "rb", buffering=0) as handle:
        handle.seek(offset)
        while done < total:
            got = handle.readinto(view[done : min(total, done + _MAX_READ)])
            if not got:
                raise CheckpointError(
                    f"{path}: expected {total} bytes at offset {offset}, found only {done} (file truncated)"
                )
            done += got


# safetensors dtype codes -> torch dtypes available in this torch build.
_SAFETENSORS_DTYPES = {
    code: getattr(torch, name)
    for code, name in {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U8": "uint8",
        "U16": "uint16",
        "U32": "uint32",
        "U64": "uint64",
        "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "C64": "complex64",
    }.items()
    if hasattr(torch, name)
}

# Real headers are a few MB at most; a larger length field means a corrupted or foreign file.
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def open_safetensors(path: str | os.PathLike) -> dict[str, LazyTensor]:
    """Parse a ``.safetensors`` header and return ``{name: LazyTensor}`` without reading tensor data."""
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"{path}: expected an 8-byte safetensors header length, found {len(prefix)} bytes"
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(_MAX_SAFETENSORS_HEADER, file_size - 8):
                raise CheckpointError(
                    f"{path}: safetensors header length {header_len} exceeds the file size {file_size} (corrupted)"
                )
            header = json.loads(handle.read(header_len))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: expected a safetensors file, could not read its header ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: expected a JSON object as safetensors header, found {type(header).__name__}")
    data_start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{path}: tensor '{name}' has an unreadable header entry {entry!r}; expected a known dtype, "
                f"shape and data_offsets"
            ) from None
        if not 0 <= begin <= end or data_start + end > file_size:
            raise CheckpointError(
                f"{path}: tensor '{name}' data [{begin}, {end}) lies outside the {file_size - data_start} data bytes"
            )
        lazy = LazyTensor(name, torch.Size(shape), dtype, path, data_start + begin, end - begin)
        if lazy.nbytes != end - begin:
            raise CheckpointError(
                f"{path}: tensor '{name}' of shape {shape} {dtype} needs {lazy.nbytes} bytes, "
                f"header gives {end - begin}"
            )
        tensors[name] = lazy
    return tensors
