"""Load a Transformers safetensors checkpoint into a tensor-parallel model, each rank reading only its slices.

The model is built on the "meta" device (no memory, no random init). Each file's header is parsed once (and checked,
so a truncated file fails before any read); every checkpoint tensor becomes a lazy `FileSlice`, and
`adapt_state_dict` takes just the rows or columns of this rank from it (after the GQA head permutation and
key/value replication). The resulting tensors become the model's parameters, carrying over their tensor-parallel
attributes. See `FileSlice` for what a read costs and what stays mapped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..formats.dtypes import torch_dtype
from ..formats.lazy_tensor import read_exact_into
from ..formats.stored_tensor import StoredTensor, read_safetensors_header
from ..errors import CheckpointError, SpecError
from ..parallel import GQAQKVColumnParallelLinear
from ..transformations import adapt_state_dict

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

# Checkpoint tensors that carry no parameter (old Llama checkpoints stored the rotary buffer).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


class FileSlice:
    """A lazy tensor of a safetensors file (a checked header entry, `formats.stored_tensor.StoredTensor`).

    Two ways to read it, chosen by the sharding functions:

    - ``slice[index]`` (a view): maps the file privately (copy-on-write, ``torch.from_file(shared=False)``) and
      indexes the tensor there. A row range is used as is: no copy, its pages come from the page cache on first
      use, and its map lives as long as the tensor. A column range is copied by the caller (`take_blocks`), and its
      map, every page of which the copy touched, goes with the view. One map per read, because a map shared by the
      whole load keeps all those pages resident (~990 MiB per rank instead of ~350).
    - ``read_rows_into(out, start, stop)`` (a copy): positioned reads of rows straight into ``out``, used when rows
      are concatenated anyway (`gather_blocks`: fused gate/up, fused qkv, replicated key/value heads). It saves
      mapping the source and tearing the map down. Owned memory is no win for rows that can stay views: it must
      zero-fill and copy every byte the views never copy, ~2x the load time (docs/benchmarks.md).
    """

    def __init__(self, stored: StoredTensor) -> None:
        self.stored = stored
        self.file, self.name, self.shape = stored.file, stored.name, stored.shape
        self.dtype = torch_dtype(stored.dtype)

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, index) -> torch.Tensor:
        return self._view()[index]

    def _view(self) -> torch.Tensor:
        """The whole tensor as a view of a private map of the file, which lives as long as the view does."""
        offset, nbytes = self.stored.offset, self.stored.nbytes
        if offset % self.dtype.itemsize or nbytes == 0:  # a typed view needs an aligned start; safetensors copies
            try:
                with safe_open(str(self.file), framework="pt") as f:
                    return f.get_slice(self.name)[:]
            except SafetensorError as e:
                raise CheckpointError(f"{self.file}: cannot read tensor {self.name}: {e}") from None
        try:  # ~25 us, against ~120 us for safe_open, which also parses the header again
            raw = torch.from_file(str(self.file), shared=False, size=offset + nbytes, dtype=torch.uint8)
        except RuntimeError as e:  # e.g. the file shrank since its header was checked
            raise CheckpointError(f"{self.file}: cannot read tensor {self.name}: {e}") from None
        return raw[offset:].view(self.dtype).view(self.shape)

    def read_rows_into(self, out: torch.Tensor, start: int, stop: int) -> None:
        """Fill the contiguous tensor ``out`` with rows ``[start, stop)``."""
        shape = (stop - start, *self.shape[1:])
        if not 0 <= start <= stop <= self.shape[0] or tuple(out.shape) != shape or out.dtype != self.dtype:
            raise CheckpointError(
                f"{self.file}: tensor {self.name} {tuple(self.shape)} {self.dtype}: cannot read rows [{start}, {stop}) "
                f"into a {tuple(out.shape)} {out.dtype} tensor"
            )
        if not out.is_contiguous():
            raise CheckpointError(f"{self.file}: rows of tensor {self.name} can only be read into a contiguous tensor")
        row_bytes = self.stored.nbytes // max(self.shape[0], 1)
        read_exact_into(self.file, self.stored.offset + start * row_bytes, out)


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
        return {name: single for name in read_safetensors_header(single)}
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
    for file in dict.fromkeys(weight_map[name] for name in expected):  # one header parse per file
        header = read_safetensors_header(file)
        for name in expected:
            if weight_map[name] != file:
                continue
            if name not in header:
                raise CheckpointError(f"{file}: the index places tensor {name} in this file, but it is not there")
            slices[name] = FileSlice(header[name])
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
