"""Incremental safetensors writing: the header is planned from names, dtypes and shapes, then tensors are appended.

`safetensors.torch.save_file` needs every tensor of a file in memory at once. Here the file's contents are planned
first (name, dtype, shape: all known from lazy handles or meta tensors), the header is written, and each tensor's
bytes are appended as soon as it is produced, so a multi-GB file is written holding one tensor at a time.

File layout (the safetensors format): 8-byte little-endian header length N, N bytes of JSON header
``{"__metadata__": {...}, name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}}`` padded with
spaces to a multiple of 8, then the raw little-endian tensor bytes, in plan order, with no gaps.

Torch-free at import: a plan's dtype is a torch dtype or a dtype name (`dtypes`), so the torch-free consolidation
path writes through the same code, hence the same bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import os
import queue
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from ..errors import CheckpointError
from ..formats.dtypes import itemsize, safetensors_code

if TYPE_CHECKING:
    import torch

WRITEBACK_STEP = 64 << 20  # start the disk write-back of every this many bytes written


def _sync_file_range() -> Callable[[int, int, int], None] | None:
    """``sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)`` from libc, or None where unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return lambda fd, offset, nbytes: call(fd, offset, nbytes, 2)  # 2: SYNC_FILE_RANGE_WRITE, does not wait


_start_writeback = _sync_file_range()


class WritebackThread:
    """Issues ``sync_file_range`` calls off the writing thread (a call can block while the disk queue is full).
    `join` before closing the descriptors submitted."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="safetensors-writeback", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            _start_writeback(*item)

    def submit(self, fd: int, offset: int, nbytes: int) -> None:
        if _start_writeback is not None:
            self._queue.put((fd, offset, nbytes))

    def join(self) -> None:
        """Wait for pending calls (before the descriptors are closed)."""
        self._queue.put(None)
        self._thread.join()


@contextlib.contextmanager
def naming_file(path: Path):
    """An OSError of a write (ENOSPC, EFBIG...) carries no file name: give it the file written, for the CLI's line."""
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno is not None:
            raise OSError(err.errno, err.strerror or str(err), str(path)) from None
        raise


@dataclass(frozen=True)
class TensorPlan:
    name: str
    dtype: Any  # a torch dtype, or a dtype name ("bfloat16") on the torch-free path
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> "TensorPlan":
        return cls(name, tensor.dtype, tuple(tensor.shape))


@dataclass(frozen=True)
class FileRecord:
    size: int
    sha256: str | None


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of ``tensor`` (made contiguous on CPU) without another copy when already contiguous."""
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def safetensors_layout(plans: Iterable[TensorPlan], metadata: Mapping[str, str] | None) -> tuple[bytes, dict[str, int]]:
    """The header of a safetensors file holding ``plans`` in this order, and the file offset of each tensor's data."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    begins = {}
    for plan in plans:
        code = safetensors_code(plan.dtype)
        if code is None:
            raise CheckpointError(f"{plan.name}: dtype {plan.dtype} cannot be stored in safetensors")
        if plan.name in header:
            raise CheckpointError(f"{plan.name}: planned twice in the same safetensors file")
        header[plan.name] = {"dtype": code, "shape": list(plan.shape), "data_offsets": [offset, offset + plan.nbytes]}
        begins[plan.name] = offset
        offset += plan.nbytes
    data = json.dumps(header, separators=(",", ":")).encode()
    data += b" " * (-(8 + len(data)) % 8)
    data = struct.pack("<Q", len(data)) + data
    return data, {name: len(data) + begin for name, begin in begins.items()}


def safetensors_header(plans: Iterable[TensorPlan], metadata: Mapping[str, str] | None) -> bytes:
    return safetensors_layout(plans, metadata)[0]


class SafetensorsStreamWriter:
    """Write one safetensors file whose tensors are planned up front and then appended in plan order.

    Use as a context manager; `write` checks each tensor against the plan, `close` checks that every planned
    tensor was written and returns the file size (and sha256 when ``hash=True``, computed while writing).
    """

    def __init__(self, path: str | os.PathLike, plans: Iterable[TensorPlan], metadata: Mapping[str, str] | None = None, *, hash: bool = False):
        self.path = Path(path)
        self.plans = list(plans)
        self._next = 0
        self._hash = hashlib.sha256() if hash else None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self._size = 0
        self._written_back = 0
        self._writeback_thread: WritebackThread | None = None
        self._emit(memoryview(safetensors_header(self.plans, metadata)))

    def _emit(self, data: memoryview) -> None:
        written = 0
        with naming_file(self.path):
            while written < len(data):
                written += os.pwrite(self._fd, data[written:], self._size + written)
        if self._hash is not None:
            self._hash.update(data)
        self._size += len(data)
        self._writeback()

    def _writeback(self) -> None:
        """Start writing what was written so far to disk, without waiting: the final fsync (atomic publish) then
        has little left to do, and the disk works while the next tensors are produced."""
        if _start_writeback is not None and self._size - self._written_back >= WRITEBACK_STEP:
            if self._writeback_thread is None:
                self._writeback_thread = WritebackThread()
            self._writeback_thread.submit(self._fd, self._written_back, self._size - self._written_back)
            self._written_back = self._size

    @property
    def pending(self) -> list[str]:
        return [p.name for p in self.plans[self._next:]]

    @property
    def done(self) -> bool:
        return self._next == len(self.plans)

    def _check_next(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> TensorPlan:
        if self._next >= len(self.plans):
            raise CheckpointError(f"{self.path}: tensor '{name}' was not planned for this file")
        plan = self.plans[self._next]
        if plan.name != name or plan.dtype != dtype or shape != plan.shape:
            raise CheckpointError(
                f"{self.path}: expected tensor '{plan.name}' {plan.dtype} {plan.shape} next, got '{name}' "
                f"{dtype} {shape}"
            )
        return plan

    def write(self, name: str, tensor: torch.Tensor) -> None:
        plan = self._check_next(name, tensor.dtype, tuple(tensor.shape))
        if plan.nbytes:
            self._emit(tensor_bytes(tensor))
        self._next += 1

    @property
    def can_copy_ranges(self) -> bool:
        """Whether `copy_ranges` works (bytes copied in the kernel cannot be hashed on the way)."""
        return self._hash is None

    def copy_ranges(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], ranges, copier) -> None:
        """Append the next planned tensor, whose bytes are ``ranges`` of input files (`byte_copy.RangeCopier`)."""
        plan = self._check_next(name, dtype, tuple(shape))
        if not self.can_copy_ranges:
            raise CheckpointError(f"{self.path}: a hashed file cannot be written by byte-range copies")
        with naming_file(self.path):
            copied = copier.copy(ranges, self._fd, self._size)
        if copied != plan.nbytes:
            raise CheckpointError(f"{self.path}: tensor '{name}' needs {plan.nbytes} bytes, its byte ranges hold {copied}")
        self._size += copied
        self._next += 1
        self._writeback()

    def fileno(self) -> int:
        return self._fd

    def close(self) -> FileRecord:
        if self._fd is None:
            return FileRecord(self._size, self._hash.hexdigest() if self._hash else None)
        self._close_fd()
        if not self.done:
            raise CheckpointError(f"{self.path}: closed before writing planned tensors {self.pending[:3]}")
        return FileRecord(self._size, self._hash.hexdigest() if self._hash else None)

    def _close_fd(self) -> None:
        if self._writeback_thread is not None:
            self._writeback_thread.join()
            self._writeback_thread = None
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def abort(self) -> None:
        self._close_fd()

    def __enter__(self) -> "SafetensorsStreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class SafetensorsPlacedWriter:
    """One safetensors file whose header is written up front and whose tensors are then written at their planned
    offsets in any order, from several threads (each call writes its own byte range: ``pwrite`` or
    ``copy_file_range`` at a fixed offset). `close` checks that every planned tensor was written once.

    The bytes are those `SafetensorsStreamWriter` writes for the same plans: the same header, the same offsets.
    ``writeback`` (shared by several files, joined by the caller before `close`) starts each tensor's write-back as
    soon as it is written."""

    def __init__(self, path: str | os.PathLike, plans: Iterable[TensorPlan], metadata: Mapping[str, str] | None, writeback: WritebackThread | None = None):
        self.path = Path(path)
        self.plans = {p.name: p for p in plans}
        header, self.offsets = safetensors_layout(self.plans.values(), metadata)
        self._left = set(self.plans)
        self._lock = threading.Lock()
        self._writeback = writeback
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self._pwrite(memoryview(header), 0)

    def _pwrite(self, data: memoryview, offset: int) -> None:
        written = 0
        with naming_file(self.path):
            while written < len(data):
                written += os.pwrite(self._fd, data[written:], offset + written)

    def _done(self, name: str) -> None:
        with self._lock:
            if name not in self._left:
                raise CheckpointError(f"{self.path}: tensor '{name}' written twice")
            self._left.discard(name)
        if self._writeback is not None and self.plans[name].nbytes:
            self._writeback.submit(self._fd, self.offsets[name], self.plans[name].nbytes)

    def _plan(self, name: str, nbytes: int) -> TensorPlan:
        plan = self.plans.get(name)
        if plan is None:
            raise CheckpointError(f"{self.path}: tensor '{name}' was not planned for this file")
        if nbytes != plan.nbytes:
            raise CheckpointError(f"{self.path}: tensor '{name}' needs {plan.nbytes} bytes, got {nbytes}")
        return plan

    def write(self, name: str, data: memoryview) -> None:
        """Write tensor ``name`` from its raw bytes."""
        self._plan(name, len(data))
        self._pwrite(data, self.offsets[name])
        self._done(name)

    def copy_ranges(self, name: str, ranges, copier) -> None:
        """Write tensor ``name`` from byte ranges of input files (`byte_copy.RangeCopier`)."""
        self._plan(name, sum(length for _, _, length in ranges))
        with naming_file(self.path):
            copier.copy(ranges, self._fd, self.offsets[name])
        self._done(name)

    def close(self) -> None:
        self.abort()
        if self._left:
            raise CheckpointError(f"{self.path}: closed before writing planned tensors {sorted(self._left)[:3]}")

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def sha256_file(path: str | os.PathLike, chunk: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while True:
            got = handle.readinto(view)
            if not got:
                break
            digest.update(view[:got])
    return digest.hexdigest()
