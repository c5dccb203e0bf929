"""Load a Transformers safetensors checkpoint into a tensor-parallel model, each rank reading only its slices.

The model is built on the "meta" device (no memory, no random init). Every checkpoint tensor is a lazy `FileSlice`
located by the file's header; `adapt_state_dict` reads just the rows or columns of this rank (after the GQA head
permutation and key/value replication) with positioned reads into memory the rank owns (nothing is memory-mapped,
so file pages never pile up in the resident set), and the resulting tensors become the model's parameters,
carrying over their tensor-parallel attributes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..checkpoint.lazy import LazyTensor, open_safetensors, read_exact_into
from ..errors import CheckpointError, SpecError
from ..parallel import GQAQKVColumnParallelLinear
from ..transformations import adapt_state_dict

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

# Checkpoint tensors that carry no parameter (old Llama checkpoints stored the rotary buffer).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


# Column slices are read through row chunks of this many bytes, so a rank never holds a whole tensor it only
# needs a few columns of.
_COLUMN_READ_CHUNK = 32 * 1024 * 1024


class FileSlice:
    """A tensor of a safetensors file read with plain positioned reads, never memory-mapped.

    ``shape`` / ``get_shape()`` come from the header. ``slice[index]`` reads exactly the rows it needs (one
    contiguous read for a row range), or, for a column range of a 2-D tensor, runs of whole rows of at most
    ``_COLUMN_READ_CHUNK`` bytes whose columns are copied out. Reads go into anonymous memory the rank owns, so
    the resident set never carries file pages, and no file is mapped or re-opened through safetensors per slice.
    """

    def __init__(self, lazy: LazyTensor, dtype_code: str) -> None:
        self.lazy, self.file, self.name = lazy, lazy.file, lazy.name
        self.shape, self.dtype = tuple(lazy.shape), dtype_code

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def _bounds(self, index) -> list[tuple[int, int]]:
        index = index if isinstance(index, tuple) else (index,)
        bounds = []
        for dim, size in enumerate(self.shape):
            part = index[dim] if dim < len(index) else slice(None)
            if not isinstance(part, slice) or part.step not in (None, 1):
                raise TypeError(f"{self.name}: only contiguous slices are supported, got {index!r}")
            start, stop, _ = part.indices(size)
            bounds.append((start, max(start, stop)))
        return bounds

    def __getitem__(self, index) -> torch.Tensor:
        bounds = self._bounds(index)
        lazy, shape = self.lazy, self.shape
        if len(shape) not in (1, 2) or not lazy.is_dense():
            full = lazy.load()
            return full[tuple(slice(a, b) for a, b in bounds)].contiguous()
        (r0, r1) = bounds[0]
        row_elems = shape[1] if len(shape) == 2 else 1
        row_bytes = row_elems * lazy.itemsize
        if len(shape) == 1 or bounds[1] == (0, shape[1]):
            out = torch.empty((r1 - r0, *shape[1:]), dtype=lazy.dtype)
            if out.numel():
                read_exact_into(self.file, lazy.offset + r0 * row_bytes, out)
            return out
        c0, c1 = bounds[1]
        out = torch.empty((r1 - r0, c1 - c0), dtype=lazy.dtype)
        rows_per_read = max(1, _COLUMN_READ_CHUNK // max(row_bytes, 1))
        for start in range(r0, r1, rows_per_read):
            stop = min(r1, start + rows_per_read)
            rows = torch.empty((stop - start, shape[1]), dtype=lazy.dtype)
            read_exact_into(self.file, lazy.offset + start * row_bytes, rows)
            out[start - r0 : stop - r0] = rows[:, c0:c1]
        return out


def _dtype_codes(file: Path) -> dict[str, str]:
    """{tensor name: safetensors dtype code} from the header (kept to report non-float tensors by their code)."""
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    return {name: entry["dtype"] for name, entry in header.items() if name != "__metadata__"}


def checkpoint_weight_map(path: str | os.PathLike) -> dict[str, Path]:
    """{tensor name: safetensors file} of a model directory (single ``model.safetensors`` or an index)."""
    path = Path(path)
    index, single = path / SAFE_WEIGHTS_INDEX_NAME, path / SAFE_WEIGHTS_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map'): {e}") from None
        files = {name: path / file for name, file in weight_map.items()}
        absent = sorted({str(f) for f in files.values() if not f.is_file()})
        if absent:
            raise CheckpointError(f"{index} names shard files that do not exist: {absent}")
        return files
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    raise CheckpointError(
        f"{path}: no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} found (files: {found}); only safetensors "
        "checkpoints are supported, convert .bin files with save_pretrained(..., safe_serialization=True)"
    )


def _unused(name: str, tied: bool) -> bool:
    return name.endswith(IGNORED_SUFFIXES) or (tied and name == "lm_head.weight")


def load_checkpoint(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype) -> None:
    """Fill ``model`` (a `ParallelForCausalLM`, usually on "meta") with this rank's part of the checkpoint."""
    weight_map = checkpoint_weight_map(path)
    expected = model.original_parameter_shapes()
    tied = model.arch.tie_word_embeddings
    missing = [name for name in expected if name not in weight_map]
    if missing:
        files = sorted({f.name for f in weight_map.values()})
        raise CheckpointError(
            f"{path}: checkpoint is missing {len(missing)} tensors of {model.arch.model_type}, e.g. {missing[:5]} "
            f"(searched {files})"
        )
    unexpected = [n for n in weight_map if n not in expected and not _unused(n, tied)]
    if unexpected:
        raise CheckpointError(
            f"{path}: checkpoint has {len(unexpected)} tensors that match no parameter of {model.arch.model_type}, "
            f"e.g. {[(n, weight_map[n].name) for n in unexpected[:5]]}; is config.json the one of these weights?"
        )
    slices = {}
    for file in dict.fromkeys(weight_map[name] for name in expected):  # headers only, one parse per file
        header = open_safetensors(file)
        codes = _dtype_codes(file)
        for name in expected:
            if weight_map[name] == file:
                slices[name] = FileSlice(header[name], codes[name])
    for name, piece in slices.items():
        if piece.shape != expected[name]:
            raise CheckpointError(f"{piece.file}: tensor {name} has shape {piece.shape}, expected {expected[name]} from config.json")
        if piece.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{piece.file}: tensor {name} has dtype {piece.dtype}, expected a floating point type")
    try:
        local = adapt_state_dict(model, slices, model.tp.rank, strict=True)
    except SpecError as e:
        raise CheckpointError(f"{path}: {e}") from None
    for name, tensor in local.items():
        if tensor.dtype != dtype:
            local[name] = tensor.to(dtype)
    assign_parameters(model, local)


def assign_parameters(model: nn.Module, local: dict[str, torch.Tensor]) -> None:
    """Replace every parameter of ``model`` by ``local[name]``, keeping its attributes (tensor-parallel ones,
    sequence-parallel mark), ``requires_grad`` and tying (a shared parameter stays shared)."""
    replacement: dict[int, nn.Parameter] = {}
    for name, old in model.named_parameters():
        if name not in local:
            raise CheckpointError(f"no weight was produced for parameter {name}")
        value = local[name]
        if tuple(value.shape) != tuple(old.shape):
            raise CheckpointError(f"{name}: loaded shape {tuple(value.shape)} does not match the parameter {tuple(old.shape)}")
        new = nn.Parameter(value.contiguous(), requires_grad=old.requires_grad)
        new.__dict__.update(old.__dict__)
        replacement[id(old)] = new
    for module in model.modules():
        for pname, param in list(module._parameters.items()):
            if param is not None and id(param) in replacement:
                module._parameters[pname] = replacement[id(param)]
        _materialize_buffers(module)


def _materialize_buffers(module: nn.Module) -> None:
    for name, buffer in list(module._buffers.items()):
        if buffer is None or not buffer.is_meta:
            continue
        if isinstance(module, GQAQKVColumnParallelLinear) and name == "_kv_index":
            module._buffers[name] = torch.tensor(module.kv_head_indices, dtype=torch.long)
        else:
            raise CheckpointError(f"buffer {name} of {type(module).__name__} is still on the meta device after loading")
