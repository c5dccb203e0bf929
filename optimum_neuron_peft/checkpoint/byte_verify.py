"""Verifying a consolidation without torch: every output byte against the rank-file bytes it comes from.

Every output of a torch-free plan, the model's and each adapter's, is a pure data move that its piece map
(`torch_free_plan.PlannedTensor`: a `RowCopy` or `ColumnGather` over (saved tensor, rank, range)) describes, so
checking it needs no tensor math. Each part (`torch_free_plan.PartPlan`) is checked in its own directory:

- the written files are opened as a loader would (the model: ``model.safetensors.index.json``, else
  ``model.safetensors``; an adapter: ``adapter_model.safetensors``), each header read by
  `stored_tensor.read_safetensors_header` (as strict as the safetensors library), an index's ``weight_map``
  checked against the files' contents;
- the key set must be exactly the part's plan (an extra or a missing tensor is named), each tensor of the planned
  dtype and shape; the caller checks that Transformers / PEFT loads that key set (`loadability`);
- each output tensor is re-read from its file and compared with the rank-file bytes its piece map names, in chunks
  (memory stays flat in model size) through plain ``preadv`` reads into reused buffers: not the copier's path
  (``copy_file_range``, `byte_copy.gather_column_bytes`), so a bug there cannot hide itself.

- every other copy too (`replica_check`): where ranks hold replicas (a replicated norm, a GQA key/value head),
  each rank's saved tensor is compared, block by block of its forward layout (the specs' ``saved_layouts``, the
  parameters' metadata), with the output rows or columns it holds, so inputs whose replicas disagree fail as they
  do under the torch re-derivation (``engine="torch"``), which re-shards the output for every rank.

The first mismatch is one `CheckpointError` line naming the rank file, the saved tensor, the output tensor and its
file. Imports no torch; numpy on use.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError
from ..formats.stored_tensor import StoredTensor, read_safetensors_header
from ..transformations.names import ADAPTER_WEIGHTS_NAME, PEFT_WRAPPER_PREFIX
from ..transformations.pieces import RowCopy, SavedLayout, row_bytes
from ..utils.safe_paths import check_safe_name
from ..utils.schema import read_json
from .byte_copy import SourceFiles, data_offset
from .optimum_neuron import XSER_TENSORS_SUFFIX
from .replica_check import forward_layouts, read_by_plan
from .schemas import INDEX_SCHEMA

if TYPE_CHECKING:
    import numpy as np

    from .torch_free_plan import ModelPlan, PartPlan, PlannedTensor

CHUNK = 8 << 20  # bytes read per side and per comparison: memory stays flat in model size
MODEL_INDEX, MODEL_FILE = "model.safetensors.index.json", "model.safetensors"


@dataclass
class BytesVerified:
    tensors: int
    bytes: int
    seconds: float

    def summary(self) -> str:
        return (
            f"verified {self.tensors} tensors, {self.bytes / 1e9:.3f} GB in {self.seconds:.2f} s against the rank-file "
            f"bytes they come from: all bit-exact [torch-free]"
        )

    def __add__(self, other: BytesVerified) -> BytesVerified:
        return BytesVerified(self.tensors + other.tensors, self.bytes + other.bytes, self.seconds + other.seconds)


def has_safetensors_model(directory: Path) -> bool:
    """Whether ``directory`` holds model weights in safetensors (what this module reads)."""
    return (directory / MODEL_INDEX).is_file() or (directory / MODEL_FILE).is_file()


def has_safetensors_output(part: PartPlan, directory: Path) -> bool:
    """Whether ``directory`` holds ``part``'s weights in safetensors (what this module reads)."""
    if part.adapter_name is None:
        return has_safetensors_model(directory)
    return (directory / ADAPTER_WEIGHTS_NAME).is_file()


def read_adapter_output(directory: Path, shown_as: Path | None = None) -> dict[str, StoredTensor]:
    """{name: StoredTensor} of the adapter weights in ``directory``, the header validated."""
    if not (directory / ADAPTER_WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{shown_as or directory}: expected consolidated adapter weights ({ADAPTER_WEIGHTS_NAME}), found none")
    return read_safetensors_header(directory / ADAPTER_WEIGHTS_NAME)


def read_model_output(directory: Path, shown_as: Path | None = None) -> dict[str, StoredTensor]:
    """{name: StoredTensor} of the model weights in ``directory``, every header validated, the index (if any)
    agreeing with its files. ``shown_as``: the directory to name in errors (the published one, when staged)."""
    shown = shown_as or directory
    index_file = directory / MODEL_INDEX
    if index_file.is_file():
        weight_map = read_json(index_file, INDEX_SCHEMA, error=CheckpointError)["weight_map"]
        files = sorted(set(weight_map.values()))
        for name in files:
            check_safe_name(name, what="shard file name", where=shown / MODEL_INDEX)
    elif (directory / MODEL_FILE).is_file():
        weight_map, files = None, [MODEL_FILE]
    else:
        raise CheckpointError(f"{shown}: expected consolidated model weights ({MODEL_INDEX} or {MODEL_FILE}), found none")
    tensors: dict[str, StoredTensor] = {}
    for file in files:
        for name, stored in read_safetensors_header(directory / file).items():
            if name in tensors:
                raise CheckpointError(f"{shown / file}: tensor '{name}' is also in {tensors[name].file.name}")
            if weight_map is not None and weight_map.get(name) != file:
                raise CheckpointError(f"{shown / MODEL_INDEX}: maps '{name}' to {weight_map.get(name)}, it is in {file}")
            tensors[name] = stored
    if weight_map is not None and set(weight_map) - set(tensors):
        missing = sorted(set(weight_map) - set(tensors))[0]
        raise CheckpointError(f"{shown / MODEL_INDEX}: maps '{missing}' to {weight_map[missing]}, which does not hold it")
    return tensors


def verify_written(plan: ModelPlan, directory: Path, *, shown_as: Path | None = None) -> BytesVerified:
    """Check every part of ``plan`` (the model, each adapter) in its subdirectory of ``directory`` (`verify_part`)."""
    result = BytesVerified(0, 0, 0.0)
    for part in plan.parts:
        shown = (shown_as or directory) / part.subdir
        result += verify_part(plan, part, directory / part.subdir, shown_as=shown)
    return result


def verify_part(plan: ModelPlan, part: PartPlan, directory: Path, *, shown_as: Path | None = None) -> BytesVerified:
    """Check the weights of ``part`` (of ``plan``) in ``directory`` (module docstring); `CheckpointError` on the
    first difference. The caller checks that the key set loads (`loadability`)."""
    start = time.perf_counter()
    shown = shown_as or directory
    adapter = part.adapter_name is not None
    written = read_adapter_output(directory, shown) if adapter else read_model_output(directory, shown)
    planned = {t.name: t for t in part.tensors}
    extra = sorted(set(written) - set(planned))
    if extra:
        raise CheckpointError(f"{shown}: holds tensors the checkpoint does not, e.g. {extra[:3]}")
    rank_file = _rank_file_names(plan)
    total = 0
    with SourceFiles() as files, _Comparer(files, rank_file, shown) as compare:
        for tensor in part.tensors:
            out = written.get(tensor.name)
            if out is None:
                raise CheckpointError(f"{shown}: consolidated output lacks tensor '{tensor.name}'")
            if (out.dtype, out.shape) != (tensor.dtype, tuple(tensor.shape)):
                raise CheckpointError(
                    f"{shown / out.file.name}: tensor '{tensor.name}' is {out.dtype} {list(out.shape)}, expected "
                    f"{tensor.dtype} {list(tensor.shape)}"
                )
            compare.tensor(tensor, out)
            total += out.nbytes
        for group, layouts in forward_layouts(plan, part):
            # the layouts name outputs as saved: an adapter's without PEFT's wrapper prefix
            outputs = {t.name.removeprefix(PEFT_WRAPPER_PREFIX) if adapter else t.name: (t, written[t.name]) for t in group}
            for layout in layouts:
                compare.replicas(layout, group[0].sources, outputs, adapter)
    return BytesVerified(len(planned), total, time.perf_counter() - start)


def _rank_file_names(plan: ModelPlan) -> dict[Path, Path]:
    """The rank file to name for a data file: itself, or for an xser tensor file, its reference file."""
    names: dict[Path, Path] = {}
    for path in (p for part in plan.parts for p in plan.source_of(part).rank_files.values()):
        names[path] = path
        names[Path(f"{path}{XSER_TENSORS_SUFFIX}")] = path
    return names


class _Comparer:
    """Reads both sides into two reused buffers and compares them (numpy: ~5 GB/s, a memoryview ``==`` ~0.6)."""

    def __init__(self, files: SourceFiles, rank_file: dict[Path, Path], shown: Path):
        import numpy as np

        self.np = np
        self.files = files
        self.rank_file = rank_file
        self.shown = shown
        self._outputs = SourceFiles(limit=4)
        self._source = np.empty(CHUNK, dtype=np.uint8)
        self._output = np.empty(CHUNK, dtype=np.uint8)

    def __enter__(self) -> "_Comparer":
        return self

    def __exit__(self, *exc) -> None:
        self._outputs.close()

    def tensor(self, tensor: PlannedTensor, out: StoredTensor) -> None:
        for k, r, _, _ in tensor.provenance.pieces:
            if not tensor.sources[k][r].is_dense():  # the planner refuses those
                raise CheckpointError(f"{tensor.sources[k][r].file}: '{tensor.sources[k][r].name}' is not dense")
        if isinstance(tensor.provenance, RowCopy):
            self._rows(tensor, out)
        else:
            self._columns(tensor, out)

    def _rows(self, tensor: PlannedTensor, out: StoredTensor) -> None:
        at = 0  # row position in the output tensor
        for k, r, first, stop in tensor.provenance.pieces:
            self._row_block(tensor, out, tensor.sources[k][r], first, at, stop - first)
            at += stop - first
        self._check_covered(tensor, out, at * row_bytes(out.shape, out.itemsize))

    def _columns(self, tensor: PlannedTensor, out: StoredTensor) -> None:
        np = self.np
        pieces = tensor.provenance.pieces
        rows, out_row = out.shape[0], row_bytes(out.shape, out.itemsize)
        widest = max([out_row, *(row_bytes(tensor.sources[k][r].shape, out.itemsize) for k, r, _, _ in pieces)])
        chunk_rows = max(1, CHUNK // max(widest, 1))
        if widest > CHUNK:  # one row wider than a buffer: grow them for this tensor (a 2-D row, still small)
            self._source, self._output = np.empty(widest, dtype=np.uint8), np.empty(widest, dtype=np.uint8)
        self._check_covered(tensor, out, rows * sum((stop - first) * out.itemsize for _, _, first, stop in pieces))
        for row in range(0, rows, chunk_rows):
            n = min(chunk_rows, rows - row)
            b = self._read(self._outputs, out.file, out.offset + row * out_row, self._output[: n * out_row])
            b = b.reshape(n, out_row)
            column = 0  # byte column in the output row
            for k, r, first, stop in pieces:
                src = tensor.sources[k][r]
                src_row, item = row_bytes(src.shape, src.itemsize), src.itemsize
                width = (stop - first) * item
                a = self._read(self.files, src.file, data_offset(src) + row * src_row, self._source[: n * src_row])
                a = a.reshape(n, src_row)[:, first * item : first * item + width]
                if not np.array_equal(a, b[:, column : column + width]):
                    i, j = divmod(int(np.flatnonzero(a != b[:, column : column + width])[0]), width)
                    raise self._mismatch(tensor, out, src, (row + i) * src_row + first * item + j, (row + i) * out_row + column + j)
                column += width

    def replicas(self, layout: SavedLayout, sources, outputs: dict, adapter: bool = False) -> None:
        """Each rank's saved ``layout.name`` against the output rows (axis 0) or columns (axis 1) of its blocks;
        the blocks the piece maps read were compared by `tensor` already. ``adapter``: blocks of outputs the
        published config drops (a shared LoRA tensor's untargeted projections, `adapter_targets`) are skipped."""
        k = next(i for i, ranks in enumerate(sources) if ranks[0].name == layout.name)
        for r, blocks in enumerate(layout.ranks):
            src, at = sources[k][r], 0
            for block in blocks:
                if block.original not in outputs and adapter:
                    at += block.stop - block.start
                    continue
                if block.original not in outputs:  # the plan rebuilds what the layouts name: a plan bug, named
                    raise CheckpointError(f"{self.shown}: '{layout.name}' holds '{block.original}', which the plan lacks")
                tensor, out = outputs[block.original]
                size = block.stop - block.start
                if not read_by_plan(tensor.provenance, k, r, at, at + size, src.shape):
                    if not src.is_dense():
                        raise CheckpointError(f"{src.file}: '{src.name}' is not dense")
                    if layout.axis == 0:
                        self._row_block(tensor, out, src, at, block.start, size)
                    else:
                        self._column_block(tensor, out, src, at, block.start, size)
                at += size

    def _row_block(self, tensor: PlannedTensor, out: StoredTensor, src: StoredTensor, first: int, start: int, rows: int) -> None:
        """Rows [first, first + rows) of ``src`` against rows [start, start + rows) of the output."""
        step = row_bytes(src.shape, src.itemsize)
        if step != row_bytes(out.shape, out.itemsize):
            raise CheckpointError(f"{self.shown}: the rows of '{src.name}' and '{tensor.name}' differ in size")
        begin, target, length = first * step, start * step, rows * step
        for i in range(0, length, CHUNK):
            n = min(CHUNK, length - i)
            a = self._read(self.files, src.file, data_offset(src) + begin + i, self._source[:n])
            b = self._read(self._outputs, out.file, out.offset + target + i, self._output[:n])
            if not self.np.array_equal(a, b):
                x = int(self.np.flatnonzero(a != b)[0])
                raise self._mismatch(tensor, out, src, begin + i + x, target + i + x)

    def _column_block(self, tensor: PlannedTensor, out: StoredTensor, src: StoredTensor, first: int, start: int, columns: int) -> None:
        """Columns [first, first + columns) of every row of 2-D ``src`` against columns [start, ...) of the output."""
        np, item = self.np, src.itemsize
        rows, src_row, out_row = src.shape[0], row_bytes(src.shape, item), row_bytes(out.shape, item)
        if rows != out.shape[0]:
            raise CheckpointError(f"{self.shown}: '{src.name}' and '{tensor.name}' differ in rows")
        widest = max(src_row, out_row)
        if widest > len(self._source):
            self._source, self._output = np.empty(widest, dtype=np.uint8), np.empty(widest, dtype=np.uint8)
        chunk_rows, width = max(1, len(self._source) // widest), columns * item
        for row in range(0, rows, chunk_rows):
            n = min(chunk_rows, rows - row)
            a = self._read(self.files, src.file, data_offset(src) + row * src_row, self._source[: n * src_row])
            a = a.reshape(n, src_row)[:, first * item : first * item + width]
            b = self._read(self._outputs, out.file, out.offset + row * out_row, self._output[: n * out_row])
            b = b.reshape(n, out_row)[:, start * item : start * item + width]
            if not np.array_equal(a, b):
                i, j = divmod(int(np.flatnonzero(a != b)[0]), width)
                raise self._mismatch(tensor, out, src, (row + i) * src_row + first * item + j, (row + i) * out_row + start * item + j)

    def _check_covered(self, tensor: PlannedTensor, out: StoredTensor, nbytes: int) -> None:
        if nbytes != out.nbytes:  # the planner checked it: a plan bug, named as such
            raise CheckpointError(f"{self.shown}: the plan of '{tensor.name}' covers {nbytes} of its {out.nbytes} bytes")

    def _read(self, files: SourceFiles, path: Path, offset: int, buffer: np.ndarray) -> np.ndarray:
        """Fill ``buffer`` with the bytes of ``path`` at ``offset`` (plain reads, short reads finished)."""
        view, fd, done = memoryview(buffer), files.fd(path), 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if not got:
                raise CheckpointError(f"{path}: expected {len(view)} bytes at offset {offset}, found only {done} (file truncated)")
            done += got
        return buffer

    def _mismatch(self, tensor: PlannedTensor, out: StoredTensor, src: StoredTensor, at_src: int, at_out: int) -> CheckpointError:
        rank_file = self.rank_file.get(src.file) or self.rank_file.get(src.file.parent) or src.file
        return CheckpointError(
            f"{rank_file}: tensor '{src.name}' differs from the bytes of '{tensor.name}' in "
            f"{self.shown / out.file.name} (first differing byte at offset {at_src} of {src.nbytes}, offset {at_out} "
            f"of the output's {out.nbytes})"
        )
