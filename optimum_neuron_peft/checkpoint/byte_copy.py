"""Executing byte provenance: copy rank-file byte ranges into output files, or gather them into a tensor.

- `row_ranges` turns a `RowCopy` into (file, offset, length) ranges, merged where contiguous; `copy_ranges` copies
  them file to file with ``os.copy_file_range`` (in the kernel, page cache to page cache: no user-space copy and no
  process memory), falling back to ``pread``/``pwrite`` through one reused buffer where the kernel refuses (across
  file systems, old kernels). Torch zip members are stored uncompressed, so they are plain byte ranges too.
- `read_ranges_into` fills a tensor from such ranges (for a ``--dtype`` cast or the ``pytorch`` output format).
- `gather_column_bytes` fills the bytes of a 2-D output from a `ColumnGather`: each shard is read whole into reused
  scratch memory, then each of its column ranges is copied into its slot of the output, as uint8 numpy views (no
  ``torch.cat``, no per-row Python loop; a ``preadv`` straight into the strided slots was tried and is slower: one
  iovec per row costs more than the extra copy; numpy's uint8 strided copy measured ~4 GB/s here, torch's int16
  ``copy_`` 3 GB/s, its bf16 one 0.3 GB/s). `gather_columns` is the same into a torch tensor.

Torch-free at import (numpy too): the torch-free consolidation path uses these with `stored_tensor.StoredTensor` sources
(the same attributes as `lazy_tensor.LazyTensor`); the tensor-facing helpers import torch, `Scratch` numpy, when used.
"""

from __future__ import annotations

import errno
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import CheckpointError
from ..transformations.pieces import ColumnGather, RowCopy, row_bytes

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ..formats.lazy_tensor import LazyTensor

ByteRange = tuple[Path, int, int]  # (file, offset, length)
_IOV_MAX = 1024
_CHUNK = 1 << 30  # at most this much per copy_file_range / pread call
_FALLBACK_BUFFER = 8 << 20
# copy_file_range unsupported for this pair of files (across file systems, old kernels, special files).
_NO_COPY_FILE_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.ETXTBSY}


class SourceFiles:
    """Read-only descriptors of input files, opened on first use, at most ``limit`` at a time (xser checkpoints
    have one file per tensor)."""

    def __init__(self, limit: int = 64):
        self.limit = limit
        self._fds: OrderedDict[Path, int] = OrderedDict()

    def fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is not None:
            self._fds.move_to_end(path)
            return fd
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as err:
            raise CheckpointError(f"{path}: cannot open rank file ({err.strerror})") from None
        self._fds[path] = fd
        if len(self._fds) > self.limit:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __enter__(self) -> "SourceFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def data_offset(lazy: LazyTensor) -> int:
    """File offset of the tensor's first byte (``lazy``: a `LazyTensor` or a `stored_tensor.StoredTensor`)."""
    return lazy.offset + lazy.storage_offset * lazy.itemsize


def row_ranges(provenance: RowCopy, lazies: Sequence[Sequence[LazyTensor]]) -> list[ByteRange] | None:
    """The file byte ranges of a row-wise output, in output order; None when a shard is not dense on disk."""
    ranges: list[list] = []
    for k, r, first, stop in provenance.pieces:
        lazy = lazies[k][r]
        if not lazy.is_dense():
            return None
        step = row_bytes(lazy.shape, lazy.itemsize)
        start, length = data_offset(lazy) + first * step, (stop - first) * step
        if not length:
            continue
        if ranges and ranges[-1][0] == lazy.file and ranges[-1][1] + ranges[-1][2] == start:
            ranges[-1][2] += length
        else:
            ranges.append([lazy.file, start, length])
    return [(path, start, length) for path, start, length in ranges]


def _truncated(path: Path, offset: int, length: int, done: int) -> CheckpointError:
    return CheckpointError(f"{path}: expected {length} bytes at offset {offset}, found only {done} (file truncated)")


class RangeCopier:
    """Copies byte ranges of input files to an output descriptor at given offsets."""

    def __init__(self, files: SourceFiles):
        self.files = files
        self.kernel_copy = hasattr(os, "copy_file_range")
        self._buffer: bytearray | None = None

    def copy(self, ranges: Sequence[ByteRange], dst: int, dst_offset: int) -> int:
        """Copy ``ranges`` one after the other to ``dst`` starting at ``dst_offset``; returns the bytes copied."""
        for path, offset, length in ranges:
            src = self.files.fd(path)
            done = 0
            while done < length and self.kernel_copy:
                try:
                    got = os.copy_file_range(src, dst, min(length - done, _CHUNK), offset + done, dst_offset + done)
                except OSError as err:
                    if err.errno not in _NO_COPY_FILE_RANGE:
                        raise
                    self.kernel_copy = False  # e.g. across file systems: pread/pwrite from now on
                    break
                if not got:
                    raise _truncated(path, offset, length, done)
                done += got
            if done < length:
                self._copy_user_space(path, src, offset + done, length - done, dst, dst_offset + done)
            dst_offset += length
        return sum(length for _, _, length in ranges)

    def _copy_user_space(self, path: Path, src: int, offset: int, length: int, dst: int, dst_offset: int) -> None:
        if self._buffer is None:
            self._buffer = bytearray(_FALLBACK_BUFFER)
        view = memoryview(self._buffer)
        done = 0
        while done < length:
            got = os.preadv(src, [view[: min(len(view), length - done)]], offset + done)
            if not got:
                raise _truncated(path, offset, length, done)
            written = 0
            while written < got:
                written += os.pwrite(dst, view[written:got], dst_offset + done + written)
            done += got


def _preadv_exact(fd: int, path: Path, buffers: list[memoryview], offset: int) -> None:
    """Fill ``buffers`` (in order) from ``fd`` at ``offset``, IOV_MAX buffers per call, finishing short reads."""
    position = offset
    for i in range(0, len(buffers), _IOV_MAX):
        batch = buffers[i : i + _IOV_MAX]
        got = os.preadv(fd, batch, position)
        for buf in batch:
            size = len(buf)
            if got >= size:
                got -= size
            else:  # a short read (rare for regular files): finish buffer by buffer
                done, got = got, 0
                while done < size:
                    more = os.preadv(fd, [buf[done:]], position + done)
                    if not more:
                        raise _truncated(path, offset, sum(len(b) for b in buffers), position + done - offset)
                    done += more
            position += size


def _bytes_view(tensor: torch.Tensor) -> memoryview:
    import torch

    return memoryview(tensor.view(-1).view(torch.uint8).numpy()).cast("B")


def read_ranges_into_bytes(files: SourceFiles, ranges: Sequence[ByteRange], view: memoryview) -> None:
    """Fill the writable byte buffer ``view`` with the bytes of ``ranges``, in order."""
    at = 0
    for path, offset, length in ranges:
        chunks = [view[at + i : at + min(length, i + _CHUNK)] for i in range(0, length, _CHUNK)]
        _preadv_exact(files.fd(path), path, chunks, offset)
        at += length
    if at != len(view):
        raise CheckpointError(f"{ranges[0][0] if ranges else '?'}: planned {at} bytes for a {len(view)}-byte tensor")


def read_ranges_into(files: SourceFiles, ranges: Sequence[ByteRange], tensor: torch.Tensor) -> None:
    """Fill the contiguous ``tensor`` with the bytes of ``ranges``, in order."""
    read_ranges_into_bytes(files, ranges, _bytes_view(tensor))


class Scratch:
    """Reused byte buffers (fresh multi-MB allocations cost a page fault per 4 KiB page on every use)."""

    def __init__(self) -> None:
        self._slots: dict[str, np.ndarray] = {}

    def get(self, slot: str, nbytes: int) -> np.ndarray:
        """A uint8 array of ``nbytes`` (contents undefined), reusing the slot's memory when large enough."""
        import numpy as np

        buffer = self._slots.get(slot)
        if buffer is None or buffer.size < nbytes:
            self._slots.pop(slot, None)
            buffer = self._slots[slot] = np.empty(nbytes, dtype=np.uint8)
        return buffer[:nbytes]


class Buffers:
    """`Scratch` handing out torch tensors of a given shape and dtype."""

    def __init__(self) -> None:
        self.scratch = Scratch()

    def get(self, slot: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        import torch

        nbytes = math.prod(shape) * dtype.itemsize
        return torch.from_numpy(self.scratch.get(slot, nbytes)).view(dtype).view(tuple(shape))


def gather_column_bytes(
    files: SourceFiles, provenance: ColumnGather, sources: Sequence[Sequence[Any]], out: np.ndarray, scratch: Scratch
) -> bool:
    """Fill ``out`` (uint8, one row of the 2-D output per row) from its column provenance; False (nothing read)
    when a shard is not dense. ``sources[k][r]``: `LazyTensor` or `stored_tensor.StoredTensor` of source k, rank r.

    Each shard is read whole (one contiguous read) into scratch memory, then its column ranges are copied into
    their slots of ``out`` (strided copies: a few per shard, no Python loop over rows)."""
    by_source: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    column = 0
    for k, r, first, stop in provenance.pieces:
        if not sources[k][r].is_dense():
            return False
        by_source.setdefault((k, r), []).append((first, stop, column))
        column += stop - first
    for (k, r), segments in by_source.items():
        shard = sources[k][r]
        item = shard.itemsize
        data = scratch.get("shard", shard.nbytes)
        read_ranges_into_bytes(files, [(shard.file, data_offset(shard), shard.nbytes)], memoryview(data))
        rows = data.reshape(shard.shape[0], -1) if shard.nbytes else data.reshape(shard.shape[0], 0)
        for first, stop, dst in segments:
            out[:, dst * item : (dst + stop - first) * item] = rows[:, first * item : stop * item]
    return True


def gather_columns(
    files: SourceFiles, provenance: ColumnGather, lazies: Sequence[Sequence[LazyTensor]], out: torch.Tensor, buffers: Buffers
) -> bool:
    """`gather_column_bytes` into the contiguous 2-D tensor ``out``."""
    import torch

    target = out.view(-1).view(torch.uint8).numpy().reshape(out.shape[0], -1)
    return gather_column_bytes(files, provenance, lazies, target, buffers.scratch)
