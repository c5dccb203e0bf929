"""Lazy handles on tensors stored inside files (torch side of `stored_tensor`).

A :class:`LazyTensor` records where a tensor's bytes live (file, byte offset, dtype, shape, strides) and reads them
only when :meth:`LazyTensor.load` is called. Reading goes through ``readinto`` into a freshly allocated tensor, so the
returned tensor owns its memory and nothing (no mmap, no whole-file buffer) stays alive after it is freed: this is
what lets the consolidation engine bound its memory to the tensors it holds at one time. Header parsing and layout
checks are torch-free, in `stored_tensor`; this module adds torch dtypes and reading.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from .dtypes import torch_dtype
from .stored_tensor import StoredTensor, TensorPlacement, check_layout, read_safetensors_header

# A read of more than 2 GiB is split by the kernel anyway; asking for at most this much per call keeps the loop simple.
_MAX_READ = 1 << 30


@dataclass(frozen=True, slots=True)
class LazyTensor(TensorPlacement):
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
        check_layout(
            self.name, self.file, self.shape, self.stride, self.offset, self.storage_offset, self.storage_nbytes,
            self.itemsize,
        )

    @classmethod
    def from_stored(cls, stored: StoredTensor) -> "LazyTensor":
        """The same tensor, with its torch dtype."""
        return cls(
            stored.name, torch.Size(stored.shape), torch_dtype(stored.dtype), stored.file, stored.offset,
            stored.storage_nbytes, stored.storage_offset, stored.stride,
        )

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def read_nbytes(self) -> int:
        """Bytes read from disk by :meth:`load` (more than ``nbytes`` for a strided view with gaps)."""
        return self.span()[1] * self.itemsize

    def load(self) -> torch.Tensor:
        """Read the tensor: a fresh, contiguous CPU tensor that owns its memory."""
        first, count = self.span()
        if count == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        buffer = torch.empty(count, dtype=self.dtype)
        read_exact_into(self.file, self.offset + first * self.itemsize, buffer)
        if self.is_dense():
            return buffer.view(self.shape)
        # Gaps or a transposed layout: read the span once, then copy the view out so the span buffer can be freed.
        view = torch.as_strided(buffer, self.shape, self.strides())
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


def open_safetensors(path: str | os.PathLike) -> dict[str, LazyTensor]:
    """Parse a ``.safetensors`` header and return ``{name: LazyTensor}`` without reading tensor data."""
    return {name: LazyTensor.from_stored(stored) for name, stored in read_safetensors_header(path).items()}
