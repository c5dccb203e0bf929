"""Load a Transformers safetensors checkpoint into a tensor-parallel model, each rank reading only its slices.

The model is built on the "meta" device (no memory, no random init). Every checkpoint tensor is opened lazily with
``safetensors.safe_open(...).get_slice(name)`` on the memory-mapped file; `adapt_state_dict` reads just the rows or
columns of this rank (after the GQA head permutation and key/value replication), and the resulting tensors become
the model's parameters, carrying over their tensor-parallel attributes. Each read maps the file only while it
copies its slice (`FileSlice`), so the file pages a rank touches never pile up in its resident memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import CheckpointError, SpecError
from ..parallel import GQAQKVColumnParallelLinear
from ..transformations import adapt_state_dict

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

# Checkpoint tensors that carry no parameter (old Llama checkpoints stored the rotary buffer).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class FileSlice:
    """A lazy tensor of a safetensors file that maps the file only while one slice is read.

    ``shape`` / ``get_shape()`` come from the header; ``slice[index]`` opens the file, copies the rows or columns
    of ``index`` out of the memory map and closes it again, so the pages touched for one read (a column slice
    touches most pages of its tensor) are released at once instead of accumulating in the resident set.
    """

    def __init__(self, file: Path, name: str, shape: tuple[int, ...], dtype: str) -> None:
        self.file, self.name, self.shape, self.dtype = file, name, shape, dtype

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, index) -> torch.Tensor:
        with safe_open(str(self.file), framework="pt") as f:
            return f.get_slice(self.name)[index]


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
    for file in dict.fromkeys(weight_map[name] for name in expected):  # headers only, one open per file
        with safe_open(str(file), framework="pt") as f:
            for name in expected:
                if weight_map[name] == file:
                    piece = f.get_slice(name)
                    slices[name] = FileSlice(file, name, tuple(piece.get_shape()), piece.get_dtype())
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
