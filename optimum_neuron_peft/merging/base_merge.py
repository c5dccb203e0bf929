"""Merge one LoRA adapter into base weights: ``W += scaling * B @ A`` for every target, streamed shard by shard.

The output safetensors files keep the input's header byte for byte (same names, dtypes, shapes, offsets, hence the
same sharding and index); untouched tensors are copied as raw bytes in blocks and only targeted weights are read
into memory, one at a time, so the peak memory is about one weight matrix whatever the model size.
The arithmetic is PEFT's ``merge_and_unload`` on an adapter loaded with default options (half-precision adapter
weights up-cast to float32): ``W.add_(transpose(B @ A, fan_in_fan_out) * scaling)``.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint.schemas import read_index_files
from ..formats.stored_tensor import read_safetensors_header
from ..errors import MergeError
from ..transformations.names import PEFT_WRAPPER_PREFIX
from ..utils.atomic import atomic_output_dir, check_output_dir
from .adapter_io import LoraModule, load_adapter
from .device import resolve_device

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_COPY_BLOCK = 64 << 20
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass
class _Shard:
    path: Path
    header_bytes: bytes  # the 8-byte length and the JSON header, copied verbatim
    entries: dict[str, dict]  # tensor name -> {"dtype", "shape", "data_offsets"}


def _read_header(path: Path) -> _Shard:
    read_safetensors_header(path)  # validated first, as strictly as the safetensors library (truncated data included)
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            raw = f.read(length)
        header = json.loads(raw)
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MergeError(f"{path}: not a readable safetensors file ({e})") from e
    header.pop("__metadata__", None)
    return _Shard(path=path, header_bytes=struct.pack("<Q", length) + raw, entries=header)


def _base_shards(base_dir: Path) -> tuple[list[_Shard], bool]:
    """The base's safetensors shards, and whether an index file lists them."""
    if not (base_dir / "config.json").is_file():
        raise MergeError(f"{base_dir / 'config.json'}: not found (expected a Transformers model directory)")
    index = base_dir / INDEX_NAME
    if index.is_file():
        files = read_index_files(index, error=MergeError)
        missing = [f for f in files if not (base_dir / f).is_file()]
        if missing:
            raise MergeError(f"{index}: lists shard(s) {missing} that are not in {base_dir}")
        return [_read_header(base_dir / f) for f in files], True
    if (base_dir / SINGLE_NAME).is_file():
        return [_read_header(base_dir / SINGLE_NAME)], False
    if any(base_dir.glob("pytorch_model*.bin")):
        raise MergeError(f"{base_dir}: only pickle (.bin) weights found; expected {SINGLE_NAME} or {INDEX_NAME} "
                         "(convert the base to safetensors first)")
    raise MergeError(f"{base_dir}: expected {SINGLE_NAME} or {INDEX_NAME}, found neither")


def _plan(shards: list[_Shard], modules: dict[str, LoraModule], fan_in_fan_out: bool, adapter_dir: Path):
    """Map each base weight name to its LoRA module; fail on a missing target or a shape mismatch."""
    where = {name: shard for shard in shards for name in shard.entries}
    plan: dict[str, LoraModule] = {}
    for module_name, module in modules.items():
        name = module_name.removeprefix(PEFT_WRAPPER_PREFIX) + ".weight"
        if name not in where:
            raise MergeError(f"{adapter_dir}: adapter targets {module_name!r} but the base has no tensor {name!r}")
        entry = where[name].entries[name]
        out_dim, in_dim = module.B.shape[0], module.A.shape[1]
        expected = [in_dim, out_dim] if fan_in_fan_out else [out_dim, in_dim]
        if list(entry["shape"]) != expected or entry["dtype"] not in ("F64", "F32", "F16", "BF16"):
            raise MergeError(f"{adapter_dir}: module {module_name!r} expects a float base weight of shape "
                             f"{tuple(expected)}, found {entry['dtype']} {tuple(entry['shape'])} in {where[name].path}")
        plan[name] = module
    return plan


def _read_tensor(f, data_start: int, entry: dict) -> torch.Tensor:
    begin, end = entry["data_offsets"]
    f.seek(data_start + begin)
    buf = bytearray(end - begin)
    if f.readinto(buf) != len(buf):  # never pad a short read with zeros
        raise MergeError(f"{f.name}: file ends inside a tensor of {len(buf)} bytes at offset {data_start + begin} (truncated?)")
    return torch.frombuffer(buf, dtype=_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def _merge_weight(weight: torch.Tensor, module: LoraModule, fan_in_fan_out: bool, device) -> torch.Tensor:
    W = weight.to(device)
    A, B = module.A.to(device), module.B.to(device)
    if A.dtype in (torch.float16, torch.bfloat16):  # PEFT loads half adapters as float32 (autocast_adapter_dtype)
        A, B = A.float(), B.float()
    delta = B @ A
    W.add_((delta.T if fan_in_fan_out else delta) * module.scaling)
    return W.cpu()


def _write_shard(shard: _Shard, target: Path, plan: dict[str, LoraModule], fan_in_fan_out, device, tick) -> None:
    data_start = len(shard.header_bytes)
    ordered = sorted(shard.entries.items(), key=lambda item: item[1]["data_offsets"][0])
    with open(shard.path, "rb") as src, open(target, "wb") as dst:
        dst.write(shard.header_bytes)
        for name, entry in ordered:
            begin, end = entry["data_offsets"]
            if dst.tell() != data_start + begin:
                raise MergeError(f"{shard.path}: tensor {name!r} does not start where the previous one ended")
            if name in plan:
                weight = _read_tensor(src, data_start, entry)
                merged = _merge_weight(weight, plan[name], fan_in_fan_out, device)
                if merged.is_floating_point() and not bool(torch.isfinite(merged).all()) and bool(torch.isfinite(weight).all()):
                    raise MergeError(f"{shard.path}: merged weight {name!r} is not finite (the adapter overflows {merged.dtype})")
                dst.write(memoryview(merged.contiguous().reshape(-1).view(torch.uint8).numpy()))
                tick(name)
                continue
            src.seek(data_start + begin)
            left = end - begin
            while left:
                block = src.read(min(left, _COPY_BLOCK))
                if not block:
                    raise MergeError(f"{shard.path}: file ends inside tensor {name!r} (truncated download?)")
                dst.write(block)
                left -= len(block)


def merge_adapter_into_base(
    base_dir: str | Path,
    adapter_dir: str | Path,
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    device: str | torch.device | None = "cpu",
    progress: Callable[[int, int, str], None] | None = None,
) -> Path:
    """Write ``base + adapter`` as a Transformers directory (same shards and index as the base), atomically."""
    base_dir, adapter_dir = Path(base_dir), Path(adapter_dir)
    check_output_dir(output_dir, overwrite, inputs=[base_dir, adapter_dir])
    dev = resolve_device(device)
    adapter = load_adapter(adapter_dir)
    fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))
    shards, indexed = _base_shards(base_dir)
    plan = _plan(shards, adapter.modules, fan_in_fan_out, adapter_dir)
    done = [0]

    def tick(name: str) -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], len(plan), name)

    skip_suffixes = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
    with atomic_output_dir(output_dir, overwrite, inputs=[base_dir, adapter_dir]) as tmp:
        for entry in sorted(base_dir.iterdir()):
            if entry.is_file() and not entry.name.endswith(skip_suffixes) and not entry.name.startswith("."):
                shutil.copy2(entry, tmp / entry.name)
        if indexed:
            shutil.copy2(base_dir / INDEX_NAME, tmp / INDEX_NAME)
        for shard in shards:
            _write_shard(shard, tmp / shard.path.name, plan, fan_in_fan_out, dev, tick)
    return Path(output_dir)
