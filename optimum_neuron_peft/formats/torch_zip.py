"""Read ``torch.save`` zip files without executing pickled code and without reading tensor data.

A ``torch.save`` file (PyTorch >= 1.6) is an uncompressed zip archive ``<archive>/data.pkl`` (the pickled object)
plus one member ``<archive>/data/<key>`` per storage. Tensors appear in the pickle as calls to
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` whose ``storage`` is a persistent id
``('storage', <torch.XStorage>, key, location, numel)``.

Safety model: :class:`RestrictedUnpickler` resolves a global only through an explicit allow-list of harmless
objects (``collections.OrderedDict``, our own rebuild functions, dtype and storage-type markers, a local stand-in for
``TensorReference``); anything else (``os.system``, ``builtins.eval``, ``subprocess.Popen``...) raises
:class:`UnsafePickleError` before it is called. Nothing from torch is called by the pickle: the rebuild functions are
ours and return `stored_tensor.StoredTensor` records (dtype by name, shape, stride, storage offset, byte offset of the
storage member in the zip).

Two layers: the ``scan_*`` functions read a rank file without torch (for the torch-free consolidation path:
`scan_torch_dict` for plain files, `scan_torch_references` and `scan_torch_tensor` for xser reference and tensor
files); `read_torch_file` and the ``open_*`` functions wrap the records as :class:`LazyTensor` (torch dtypes) and
resolve ``TensorReference`` dtypes to torch dtypes.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import CheckpointError, UnsafePickleError
from .dtypes import DTYPES, dtype_name, itemsize
from .stored_tensor import StoredTensor

if TYPE_CHECKING:
    from .lazy_tensor import LazyTensor

# The pickled part of a rank or metadata file (names, shapes, offsets) is a few MB for the largest models: more is
# refused before it is read, so a small hostile file cannot make a reader allocate gigabytes.
MAX_PICKLE_BYTES = 64 << 20

# ---------------------------------------------------------------------------------------------------------------------
# Objects the pickle may name


@dataclass(frozen=True, slots=True)
class _StorageType:
    """Stand-in for ``torch.FloatStorage`` & co. (dtype set) or ``torch.UntypedStorage`` (dtype None, sizes in bytes).

    An instance, not a class: a pickle that tries to *call* it fails with TypeError instead of building something.
    """

    name: str
    dtype: str | None  # dtype name (`dtypes`)


@dataclass(frozen=True, slots=True)
class _Dtype:
    """Stand-in for a ``torch.<dtype>`` global (an instance, not callable)."""

    name: str


def _legacy_storage_types() -> dict[str, _StorageType]:
    names = {
        "DoubleStorage": "float64",
        "FloatStorage": "float32",
        "HalfStorage": "float16",
        "BFloat16Storage": "bfloat16",
        "LongStorage": "int64",
        "IntStorage": "int32",
        "ShortStorage": "int16",
        "CharStorage": "int8",
        "ByteStorage": "uint8",
        "BoolStorage": "bool",
        "ComplexDoubleStorage": "complex128",
        "ComplexFloatStorage": "complex64",
    }
    return {name: _StorageType(name, dtype) for name, dtype in names.items()}


_STORAGE_TYPES = _legacy_storage_types()
_UNTYPED_STORAGE = _StorageType("UntypedStorage", None)
# `torch.<dtype>` globals appear with `_rebuild_tensor_v3` (newer dtypes are saved as UntypedStorage + dtype). Only
# byte-addressable, non-quantized dtypes: a tensor is read as raw bytes.
_DTYPE_NAMES = (
    "float64 double float32 float float16 half bfloat16 int64 long int32 int int16 short int8 uint8 bool "
    "uint16 uint32 uint64 complex64 cfloat complex128 cdouble "
    "float8_e4m3fn float8_e5m2 float8_e4m3fnuz float8_e5m2fnuz float8_e8m0fnu"
).split()
_DTYPES = {name: _Dtype(dtype_name(name)) for name in _DTYPE_NAMES if dtype_name(name) in DTYPES}


@dataclass(slots=True)
class TensorReference:
    """Local stand-in for ``torch_xla.utils.serialization.TensorReference``: tensor ``tid`` lives in
    ``<file>.tensors/tensor_<tid>.pt``. Newer Neuron variants also record ``shape`` and ``dtype`` (a torch dtype:
    its name from `scan_torch_references`, the torch dtype from `open_torch_dict`)."""

    tid: int
    shape: tuple[int, ...] | None = None
    dtype: Any = None

    def __setstate__(self, state: Any) -> None:
        # Pickle's BUILD opcode: accept only the fields the format has, with the types it has.
        if isinstance(state, tuple) and len(state) == 2 and state[0] is None:
            state = state[1]  # (dict_state, slot_state) form
        if not isinstance(state, dict) or set(state) - {"tid", "shape", "dtype"}:
            raise UnsafePickleError(f"TensorReference state must be a dict with tid/shape/dtype, found {state!r}")
        tid, shape, dtype = state.get("tid"), state.get("shape"), state.get("dtype")
        if type(tid) is not int or tid < 0:
            raise UnsafePickleError(f"TensorReference.tid must be a non-negative int, found {tid!r}")
        if shape is not None and not (isinstance(shape, (tuple, list)) and all(type(d) is int for d in shape)):
            raise UnsafePickleError(f"TensorReference.shape must be a tuple of ints, found {shape!r}")
        if dtype is not None and not isinstance(dtype, _Dtype):
            raise UnsafePickleError(f"TensorReference.dtype must be a torch dtype, found {dtype!r}")
        # The dtype by name here (torch-free); `open_torch_dict` makes it a torch dtype for the torch path.
        self.tid, self.shape, self.dtype = tid, None if shape is None else tuple(shape), None if dtype is None else dtype.name


# Where the xser reference class is defined: torch_xla's, and Neuron's forks of the same module. Mapping any of them
# to our stand-in is safe because the real module is never imported.
_TENSOR_REFERENCE_MODULES = {
    "torch_xla.utils.serialization",
    "neuronx_distributed.parallel_layers.serialization",
    "neuronx_distributed.trainer.serialization",
}


def _size(*args: Any) -> tuple[int, ...]:
    # torch.Size(iterable of ints) only, as a tuple; never anything that could run code.
    if len(args) != 1 or not isinstance(args[0], (tuple, list)) or not all(type(d) is int for d in args[0]):
        raise UnsafePickleError(f"torch.Size expects one tuple of ints, found {args!r}")
    return tuple(args[0])


def _ordered_dict(*args: Any) -> collections.OrderedDict:
    # OrderedDict() or OrderedDict(list of pairs): the backward-hooks argument of the rebuild functions.
    if len(args) > 1 or (args and not isinstance(args[0], (list, tuple, dict))):
        raise UnsafePickleError(f"collections.OrderedDict expects nothing or a list of pairs, found {args!r}")
    return collections.OrderedDict(*args)


# ---------------------------------------------------------------------------------------------------------------------
# Unpickler


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose globals come only from ``allowed`` and whose persistent ids go to ``persistent``.

    ``source`` names the file in error messages. With ``persistent`` None (metadata files) a persistent id is refused.
    """

    def __init__(
        self,
        data: bytes,
        source: str,
        allowed: dict[tuple[str, str], Any],
        persistent: Callable[[Any], Any] | None = None,
    ) -> None:
        super().__init__(io.BytesIO(data))
        self._source = source
        self._allowed = allowed
        self._persistent = persistent

    def find_class(self, module: str, name: str) -> Any:
        # Overriding find_class also disables pickle's Python 2 name mapping: names are checked exactly as written.
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        expected = (
            "plain dict/list/str/int/float/bool/None data"
            if self._persistent is None
            else "tensor rebuild functions, storage types, dtypes and OrderedDict"
        )
        raise UnsafePickleError(
            f"{self._source}: refusing to load global '{module}.{name}' from a pickle; expected only {expected} "
            f"(the file is corrupted or malicious)"
        )

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise UnsafePickleError(f"{self._source}: expected plain data, found a persistent reference {pid!r}")
        return self._persistent(pid)


def restricted_loads(data: bytes, source: str, allowed: dict, persistent: Callable[[Any], Any] | None = None) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`, turning every failure into a one-line CheckpointError."""
    try:
        return RestrictedUnpickler(data, source, allowed, persistent).load()
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure of a hostile or corrupted pickle is a file error
        raise CheckpointError(
            f"{source}: expected a readable pickle, found a corrupted one ({type(err).__name__}: {err})"
        ) from None


# ---------------------------------------------------------------------------------------------------------------------
# Zip layout

_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_LOCAL_HEADER_SIGNATURE = 0x04034B50


@dataclass(frozen=True, slots=True)
class _StorageRecord:
    """A storage member located in the zip: where its bytes start and how many there are."""

    member: str
    dtype: str | None
    data_offset: int
    nbytes: int


class _TorchZip:
    """The members of one ``torch.save`` archive, with the file offsets of their data."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        try:
            self.file_size = path.stat().st_size
            with open(path, "rb") as handle:
                head = handle.read(4)
        except OSError as err:
            raise CheckpointError(f"{path}: cannot read the file ({err.strerror})") from None
        if head != b"PK\x03\x04":
            found = "a legacy (PyTorch < 1.6) or raw pickle" if head[:1] == b"\x80" else f"bytes {head!r}"
            raise CheckpointError(
                f"{path}: expected a torch.save zip archive (PyTorch >= 1.6), found {found}; re-save it with a "
                f"recent torch.save"
            )
        try:
            with zipfile.ZipFile(path) as archive:
                self.members = {info.filename: info for info in archive.infolist()}
                self.archive_name = self._find_archive_name()
                self.pickle_bytes = self._read_member(archive, f"{self.archive_name}/data.pkl", MAX_PICKLE_BYTES)
                byteorder_member = f"{self.archive_name}/byteorder"
                byteorder = self._read_member(archive, byteorder_member, 16) if byteorder_member in self.members else b"little"
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as err:
            if isinstance(err, CheckpointError):
                raise
            raise CheckpointError(
                f"{path}: expected a valid torch.save zip archive, found a corrupted or truncated one ({err})"
            ) from None
        if byteorder != b"little":
            raise CheckpointError(f"{path}: expected little-endian tensor data, found byteorder {byteorder!r}")

    def _read_member(self, archive: zipfile.ZipFile, member: str, limit: int) -> bytes:
        """A small member, its declared size checked before reading and its (de)compressed size bounded while
        reading: a compressed ``data.pkl`` cannot make us allocate more than ``limit`` bytes."""
        info = self.members[member]
        if info.file_size > limit:
            raise CheckpointError(f"{self.path}: member '{member}' declares {info.file_size} bytes, expected at most {limit}")
        with archive.open(info) as handle:
            data = handle.read(limit + 1)
        if len(data) > limit:
            raise CheckpointError(f"{self.path}: member '{member}' holds more than {limit} bytes (expected at most {limit})")
        return data

    def _find_archive_name(self) -> str:
        candidates = sorted(name[: -len("/data.pkl")] for name in self.members if name.endswith("/data.pkl"))
        candidates = [name for name in candidates if "/" not in name]
        if len(candidates) != 1:
            raise CheckpointError(
                f"{self.path}: expected exactly one '<archive>/data.pkl' member, found {len(candidates)}"
            )
        return candidates[0]

    def storage(self, key: str, dtype: str | None, nbytes: int) -> _StorageRecord:
        member = f"{self.archive_name}/data/{key}"
        info = self.members.get(member)
        if info is None:
            raise CheckpointError(f"{self.path}: expected storage member '{member}', it is missing")
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise CheckpointError(
                f"{self.path}: expected storage member '{member}' stored uncompressed, found compression "
                f"{info.compress_type}"
            )
        if info.file_size != nbytes:
            raise CheckpointError(
                f"{self.path}: storage member '{member}' should hold {nbytes} bytes, found {info.file_size}"
            )
        data_offset = self._data_offset(info)
        if data_offset + nbytes > self.file_size:
            raise CheckpointError(
                f"{self.path}: storage member '{member}' ends at byte {data_offset + nbytes}, past the end of the "
                f"{self.file_size}-byte file (truncated)"
            )
        return _StorageRecord(member, dtype, data_offset, nbytes)

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        # The central directory gives the local header's offset; the data follows that header's variable-size name and
        # extra fields, whose lengths only the local header knows (torch pads the extra field to align data).
        name = info.filename.encode()
        if self._fd is None:  # one descriptor for all the members (a rank file has hundreds), see `close`
            self._fd = os.open(self.path, os.O_RDONLY)
        raw = os.pread(self._fd, _LOCAL_HEADER.size + len(name), info.header_offset)
        if len(raw) != _LOCAL_HEADER.size + len(name):
            raise CheckpointError(f"{self.path}: local header of '{info.filename}' is truncated")
        fields = _LOCAL_HEADER.unpack(raw[: _LOCAL_HEADER.size])
        name_len, extra_len = fields[9], fields[10]
        if fields[0] != _LOCAL_HEADER_SIGNATURE or fields[3] != zipfile.ZIP_STORED or raw[_LOCAL_HEADER.size :] != name or name_len != len(name):
            raise CheckpointError(
                f"{self.path}: local header of '{info.filename}' does not match the central directory (corrupted)"
            )
        return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ---------------------------------------------------------------------------------------------------------------------
# Rebuilding tensors as StoredTensor


class _TensorRebuilder:
    """Persistent-id loader and ``_rebuild_*`` replacements bound to one archive. ``references``: whether xser
    ``TensorReference`` objects are allowed (the torch path reads them; the torch-free scan does not)."""

    def __init__(self, archive: _TorchZip, references: bool = True) -> None:
        self.archive = archive
        self.source = str(archive.path)
        self.records: dict[str, _StorageRecord] = {}
        self.references = references

    def allowed_globals(self) -> dict[tuple[str, str], Any]:
        allowed = {("torch", name): storage for name, storage in _STORAGE_TYPES.items()}
        allowed.update({("torch", name): dtype for name, dtype in _DTYPES.items()})
        if self.references:
            allowed.update({(module, "TensorReference"): TensorReference for module in _TENSOR_REFERENCE_MODULES})
        return allowed | {
            ("collections", "OrderedDict"): _ordered_dict,
            ("torch._utils", "_rebuild_tensor"): self.rebuild_tensor,
            ("torch._utils", "_rebuild_tensor_v2"): self.rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor_v3"): self.rebuild_tensor_v3,
            ("torch._utils", "_rebuild_parameter"): self.rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self.rebuild_parameter,
            ("torch.storage", "UntypedStorage"): _UNTYPED_STORAGE,
            ("torch", "UntypedStorage"): _UNTYPED_STORAGE,
            ("torch", "Size"): _size,
        }

    def persistent_load(self, pid: Any) -> _StorageRecord:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(
                f"{self.source}: expected a ('storage', type, key, location, numel) id, found {pid!r}"
            )
        _, storage_type, key, _location, numel = pid
        valid = isinstance(storage_type, _StorageType) and isinstance(key, str) and type(numel) is int and numel >= 0
        if not valid:
            raise CheckpointError(f"{self.source}: malformed storage id {pid!r}")
        record = self.records.get(key)
        if record is None:
            size = 1 if storage_type.dtype is None else itemsize(storage_type.dtype)
            record = self.archive.storage(key, storage_type.dtype, numel * size)
            self.records[key] = record
        return record

    def _stored(self, storage: Any, storage_offset: Any, size: Any, stride: Any, dtype: str | None) -> StoredTensor:
        if not isinstance(storage, _StorageRecord):
            raise CheckpointError(f"{self.source}: expected a storage as first rebuild argument, found {storage!r}")
        dtype = dtype or storage.dtype
        if dtype is None:
            raise CheckpointError(f"{self.source}: untyped storage '{storage.member}' used without a dtype")
        ints = lambda xs: isinstance(xs, (tuple, list)) and all(type(x) is int for x in xs)  # noqa: E731
        if type(storage_offset) is not int or not ints(size) or not ints(stride):
            raise CheckpointError(
                f"{self.source}: expected int offset and int tuples for size/stride, found "
                f"{storage_offset!r}, {size!r}, {stride!r}"
            )
        return StoredTensor(
            name="",
            shape=tuple(size),
            dtype=dtype,
            file=self.archive.path,
            offset=storage.data_offset,
            storage_nbytes=storage.nbytes,
            storage_offset=storage_offset,
            stride=tuple(stride),
        )

    def rebuild_tensor(self, storage: Any, storage_offset: Any, size: Any, stride: Any) -> StoredTensor:
        return self._stored(storage, storage_offset, size, stride, None)

    def rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None):
        return self._stored(storage, storage_offset, size, stride, None)

    def rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad, hooks, dtype, metadata=None):
        if not isinstance(dtype, _Dtype):
            raise CheckpointError(f"{self.source}: expected a torch dtype in _rebuild_tensor_v3, found {dtype!r}")
        return self._stored(storage, storage_offset, size, stride, dtype.name)

    def rebuild_parameter(self, data: Any, *_ignored: Any) -> StoredTensor:
        # nn.Parameter(data, requires_grad): for reading, a parameter is just its data.
        if not isinstance(data, StoredTensor):
            raise CheckpointError(f"{self.source}: expected a tensor inside _rebuild_parameter, found {data!r}")
        return data


# ---------------------------------------------------------------------------------------------------------------------
# Public entry points


def _unpickle(path: str | os.PathLike, references: bool) -> Any:
    archive = _TorchZip(Path(path))
    rebuilder = _TensorRebuilder(archive, references)
    try:
        return restricted_loads(
            archive.pickle_bytes, str(archive.path), rebuilder.allowed_globals(), rebuilder.persistent_load
        )
    finally:
        archive.close()


def _as_lazy(value: Any) -> Any:
    """``value`` with every `StoredTensor` (at the top, or inside dicts, lists and tuples) as a `LazyTensor`."""
    from .lazy_tensor import LazyTensor

    if isinstance(value, StoredTensor):
        return LazyTensor.from_stored(value)
    if isinstance(value, dict):
        return type(value)((key, _as_lazy(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_as_lazy(item) for item in value)
    return value


def read_torch_file(path: str | os.PathLike) -> Any:
    """Unpickle a ``torch.save`` zip file with tensors replaced by :class:`LazyTensor` handles (names are empty;
    :func:`open_torch_state_dict` fills them) and xser references by :class:`TensorReference` (dtypes by name)."""
    return _as_lazy(_unpickle(path, references=True))


def _check_flat_dict(path: str | os.PathLike, obj: Any, kinds: tuple[type, ...]) -> None:
    if not isinstance(obj, dict) or not all(isinstance(key, str) for key in obj):
        raise CheckpointError(f"{path}: expected a dict with str keys, found {type(obj).__name__}")
    for key, value in obj.items():
        if not isinstance(value, kinds):
            raise CheckpointError(f"{path}: expected a tensor under '{key}', found {type(value).__name__}")


def scan_torch_dict(path: str | os.PathLike) -> dict[str, StoredTensor]:
    """Where each tensor of a ``torch.save`` of a flat ``{str: tensor}`` dict is, without torch and without reading
    tensor data. xser references are refused (`UnsafePickleError`): their tensors live in other files."""
    obj = _unpickle(path, references=False)
    _check_flat_dict(path, obj, (StoredTensor,))
    return {key: value.renamed(key) for key, value in obj.items()}


def scan_torch_references(path: str | os.PathLike) -> dict[str, StoredTensor | TensorReference]:
    """`scan_torch_dict` that also takes xser references (dtypes by name), without torch: an xser rank file."""
    obj = _unpickle(path, references=True)
    _check_flat_dict(path, obj, (StoredTensor, TensorReference))
    return {key: value.renamed(key) if isinstance(value, StoredTensor) else value for key, value in obj.items()}


def scan_torch_tensor(path: str | os.PathLike, name: str = "") -> StoredTensor:
    """Where the tensor of a ``torch.save`` of one tensor (an xser ``tensor_<i>.pt`` file) is, without torch."""
    obj = _unpickle(path, references=False)
    if not isinstance(obj, StoredTensor):
        raise CheckpointError(f"{path}: expected a single saved tensor, found {type(obj).__name__}")
    return obj.renamed(name)


def open_torch_dict(path: str | os.PathLike) -> dict[str, LazyTensor | TensorReference]:
    """Open a ``torch.save`` of a flat ``{str: tensor or TensorReference}`` dict; values are lazy, reference dtypes
    torch dtypes."""
    from .dtypes import torch_dtype

    opened = {}
    for key, value in scan_torch_references(path).items():
        if isinstance(value, TensorReference) and value.dtype is not None:
            value = TensorReference(value.tid, value.shape, torch_dtype(value.dtype))
        opened[key] = _as_lazy(value)
    return opened


def open_torch_state_dict(path: str | os.PathLike) -> dict[str, LazyTensor]:
    """Open a plain ``torch.save`` state dict ``{name: tensor}`` without reading tensor data."""
    tensors = open_torch_dict(path)
    for key, value in tensors.items():
        if isinstance(value, TensorReference):
            raise CheckpointError(f"{path}: expected a tensor under '{key}', found an xser TensorReference")
    return tensors  # type: ignore[return-value]


def open_torch_tensor(path: str | os.PathLike, name: str = "") -> LazyTensor:
    """Open a ``torch.save`` of one tensor (an xser ``tensor_<i>.pt`` file)."""
    return _as_lazy(scan_torch_tensor(path, name))


def load_plain_pickle(path: str | os.PathLike) -> Any:
    """Load a pickle (raw, or a ``torch.save`` zip) that may hold only dict/list/tuple/str/int/float/bool/None.

    Every global and every persistent id (tensor storage) is refused: this is for metadata files.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the file ({err.strerror})") from None
    if head == b"PK\x03\x04":
        data = _TorchZip(path).pickle_bytes
    else:
        with open(path, "rb") as handle:
            data = handle.read(MAX_PICKLE_BYTES + 1)
        if len(data) > MAX_PICKLE_BYTES:
            raise CheckpointError(f"{path}: expected a pickle of at most {MAX_PICKLE_BYTES} bytes, found more")
    return restricted_loads(data, str(path), allowed={})
