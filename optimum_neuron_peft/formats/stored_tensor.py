"""Where a saved tensor's bytes are, described without torch, and a header-only safetensors reader.

`StoredTensor` is what reading a rank file's header (safetensors) or pickle (`torch_zip`) yields: name, shape,
dtype *name*, file, byte offset of its storage, and its layout in that storage. The torch path wraps it in a
`lazy_tensor.LazyTensor` (same fields, torch dtype, a ``load`` method); the torch-free consolidation path uses it as is.
Both validate the layout here, once, so a bad file fails the same way whichever path reads it.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import CheckpointError
from ..utils.schema import parse_json
from .dtypes import DTYPES, SAFETENSORS_CODES, dtype_name

# Real headers are a few MB at most; a larger length field means a corrupted or foreign file.
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major strides of ``shape`` (what ``torch.empty(shape).stride()`` returns)."""
    strides = []
    step = 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def storage_span(shape: Sequence[int], strides: Sequence[int], storage_offset: int) -> tuple[int, int]:
    """(first element, element count) of the storage region a tensor of this layout touches."""
    if math.prod(shape) == 0:
        return storage_offset, 0
    last = storage_offset + sum((size - 1) * step for size, step in zip(shape, strides))
    return storage_offset, last - storage_offset + 1


def is_dense_layout(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """True when the layout is row-major contiguous (the span read from disk is the tensor itself)."""
    return all(size == 1 or step == want for size, step, want in zip(shape, strides, contiguous_strides(shape)))


def check_layout(
    name: str, file: Path, shape: Sequence[int], stride: Sequence[int] | None, offset: int, storage_offset: int,
    storage_nbytes: int, itemsize: int,
) -> None:
    """Raise `CheckpointError` unless the tensor lies inside its storage with a valid layout."""
    strides = contiguous_strides(shape) if stride is None else tuple(stride)
    if len(strides) != len(shape) or any(s < 0 for s in strides) or any(d < 0 for d in shape):
        raise CheckpointError(
            f"{file}: tensor '{name}' has an invalid layout; expected non-negative sizes and one "
            f"non-negative stride per dim, found shape {tuple(shape)} stride {strides}"
        )
    if storage_offset < 0 or offset < 0:
        raise CheckpointError(f"{file}: tensor '{name}' has a negative offset")
    first, count = storage_span(shape, strides, storage_offset)
    end = (first + count) * itemsize
    if count and end > storage_nbytes:
        raise CheckpointError(
            f"{file}: tensor '{name}' needs {end} bytes of its storage, found only "
            f"{storage_nbytes} (truncated or corrupted storage)"
        )


class TensorPlacement:
    """Sizes and layout shared by `StoredTensor` and `lazy_tensor.LazyTensor`, from their ``shape``, ``stride``,
    ``storage_offset`` and ``itemsize`` (the one place the two differ: a dtype name here, a torch dtype there)."""

    __slots__ = ()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor itself (contiguous)."""
        return self.numel * self.itemsize

    def strides(self) -> tuple[int, ...]:
        return contiguous_strides(tuple(self.shape)) if self.stride is None else tuple(self.stride)

    def span(self) -> tuple[int, int]:
        """(first element, element count) of the storage region the tensor touches."""
        return storage_span(tuple(self.shape), self.strides(), self.storage_offset)

    def is_dense(self) -> bool:
        """True when the span read from disk is exactly the tensor in row-major order (no copy needed)."""
        return self.stride is None or is_dense_layout(tuple(self.shape), self.stride)


@dataclass(frozen=True, slots=True)
class StoredTensor(TensorPlacement):
    """One tensor inside a file (fields as `lazy_tensor.LazyTensor`'s, with the dtype by name); validated when built.

    ``offset`` is the absolute byte offset in ``file`` of element 0 of the tensor's storage, ``storage_nbytes``
    that storage's size, ``storage_offset``/``stride`` (in elements) the tensor's place in it.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: Path
    offset: int
    storage_nbytes: int
    storage_offset: int = 0
    stride: tuple[int, ...] | None = None  # None: row-major contiguous

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if not isinstance(self.file, Path):
            object.__setattr__(self, "file", Path(self.file))
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        if self.dtype not in DTYPES:
            raise CheckpointError(f"{self.file}: tensor '{self.name}' has unknown dtype {self.dtype!r}")
        check_layout(self.name, self.file, self.shape, self.stride, self.offset, self.storage_offset, self.storage_nbytes, self.itemsize)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][0]

    def renamed(self, name: str) -> "StoredTensor":
        """The same tensor under another name (no new validation: the layout was checked)."""
        if name == self.name:
            return self
        copy = object.__new__(StoredTensor)
        for field_name in self.__slots__:
            object.__setattr__(copy, field_name, getattr(self, field_name))
        object.__setattr__(copy, "name", name)
        return copy


def read_safetensors_header(path: str | os.PathLike) -> dict[str, StoredTensor]:
    """Parse a ``.safetensors`` header (8-byte little-endian length, JSON) into ``{name: StoredTensor}``, checking
    every entry's dtype, shape and data range against the file size, without reading tensor data."""
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
            if header_len > min(MAX_SAFETENSORS_HEADER, file_size - 8):
                raise CheckpointError(
                    f"{path}: safetensors header length {header_len} exceeds the file size {file_size} (corrupted)"
                )
            raw = handle.read(header_len)
    except OSError as err:
        raise CheckpointError(f"{path}: expected a safetensors file, could not read its header ({err})") from None
    try:
        header = parse_json(raw, file="JSON header", error=CheckpointError)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: expected a safetensors file, could not read its header ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: expected a JSON object as safetensors header, found {type(header).__name__}")
    data_start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_CODES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{path}: tensor '{name}' has an unreadable header entry {entry!r}; expected a known dtype, "
                f"shape and data_offsets"
            ) from None
        if not 0 <= begin <= end or data_start + end > file_size:
            raise CheckpointError(
                f"{path}: tensor '{name}' needs data bytes [{begin}, {end}), the file holds only "
                f"{file_size - data_start} (truncated? download or copy it again)"
            )
        stored = StoredTensor(name, shape, dtype, path, data_start + begin, end - begin)
        if stored.nbytes != end - begin:
            raise CheckpointError(
                f"{path}: tensor '{name}' of shape {shape} {dtype} needs {stored.nbytes} bytes, "
                f"header gives {end - begin}"
            )
        tensors[name] = stored
    check_like_safetensors(path, raw, header, file_size)
    return tensors


def check_like_safetensors(path: Path, raw: bytes, header: dict, file_size: int) -> None:
    """Refuse what the safetensors library refuses, as strictly (its ``Metadata::validate``): a header starting with
    ``{``; ``__metadata__`` mapping strings to strings; every tensor entry with integer (never fractional)
    ``shape`` and ``data_offsets``; the data ranges, sorted, tiling the data section from 0 with no gap, overlap or
    duplicate, and ending exactly at the end of the file. Written here rather than by calling the library: its
    ``safe_open`` imports numpy or torch (0.2 s or more), which the torch-free engine exists to avoid; the
    equivalence is pinned by a property test against the library itself (``tests/cli/test_fuzz_readers.py``)."""
    if not raw.startswith(b"{"):
        raise CheckpointError(f"{path}: expected the safetensors header to start with '{{' (corrupted)")
    metadata = header.get("__metadata__", {})
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path}: expected '__metadata__' to map strings to strings, found {metadata!r}"[:300])
    ranges = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(_is_u64(d) for d in shape)) or not (
            isinstance(offsets, list) and len(offsets) == 2 and all(_is_u64(x) for x in offsets)
        ):
            raise CheckpointError(
                f"{path}: tensor '{name}': expected a shape and data_offsets of non-negative integers, found "
                f"{shape!r} and {offsets!r}"[:300]
            )
        ranges.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(ranges):
        if begin != end or stop < begin:
            raise CheckpointError(
                f"{path}: tensor '{name}' has data_offsets [{begin}, {stop}], expected it to start at {end} "
                f"(overlapping, duplicate or out-of-order offsets)"
            )
        end = stop
    if 8 + (len(raw)) + end != file_size:
        raise CheckpointError(
            f"{path}: the tensors' data ends at byte {8 + len(raw) + end}, the file has {file_size} bytes "
            f"(truncated, or bytes after the last tensor)"
        )


def _is_u64(value: object) -> bool:
    return type(value) is int and 0 <= value < 1 << 64
