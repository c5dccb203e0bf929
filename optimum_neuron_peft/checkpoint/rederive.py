"""Re-derive every rank's shards from a consolidated directory and compare them with the rank files.

For each group of the sharded checkpoint, the consolidated tensors are read back, sharded again through the
group's specs (`adapt_state_dict`) for every tp rank, and compared bit for bit with the rank files. The first
mismatch is reported by rank file and tensor name. With a ``dtype`` cast, the input is cast the same way first.
optimum-neuron's shared ``lora_A`` / fused ``lora_B`` are compared in their saved form (the re-derived
per-projection tensors are re-fused; the duplicated lora_A copies must agree).

Used by `consolidate` (``verify=True``, on the staged output) and by `verify` (on a finished directory).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..formats.lazy_tensor import LazyTensor, open_safetensors
from ..formats.torch_zip import open_torch_state_dict
from ..transformations.model import adapt_state_dict
from ..transformations.names import ADAPTER_PICKLE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME
from ..utils.safe_paths import check_inside
from .schemas import read_index_files
from .source import checked


@dataclass
class VerifyResult:
    tensors: int
    bytes: int
    seconds: float
    reason: str | None = None  # why the torch re-derivation, not `byte_verify` (`verify.verify`)

    def summary(self) -> str:
        why = f" [torch re-derivation: {self.reason}]" if self.reason else ""
        return f"verified {self.tensors} rank tensors, {self.bytes / 1e9:.3f} GB in {self.seconds:.2f} s: all bit-exact{why}"


def open_output(directory: Path, kind: str) -> dict[str, LazyTensor]:
    """{name: LazyTensor} of a consolidated Transformers or PEFT directory (safetensors or pytorch)."""
    names = {"model": ["model.safetensors.index.json", "pytorch_model.bin.index.json", "model.safetensors", "pytorch_model.bin"],
             "adapter": [ADAPTER_WEIGHTS_NAME, ADAPTER_PICKLE_WEIGHTS_NAME]}[kind]  # fmt: skip
    for name in names:
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            files = read_index_files(path)
        else:
            files = [name]
        tensors: dict[str, LazyTensor] = {}
        for file in files:
            opener = open_safetensors if file.endswith(".safetensors") else open_torch_state_dict
            tensors.update(opener(directory / file))
        return tensors
    raise CheckpointError(f"{directory}: expected consolidated {kind} weights ({' or '.join(names)}), found none")


def _fused_orders(specs) -> dict[str, list[str]]:
    """fused module suffix -> order of its projections' suffixes (``qkv_proj`` -> [q, k, v])."""
    orders = {}
    for spec in specs:
        for fused, projections in spec.fused_projections().items():
            orders[fused] = list(projections.keys)
    return orders


def _to_saved_layout(derived: dict[str, torch.Tensor], saved_names: list[str], module: str | None, orders: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """Re-fuse per-projection LoRA tensors into optimum-neuron's shared/fused names when those are what was saved."""
    out = dict(derived)
    for name in saved_names:
        if name in out or module is None:
            continue
        for fused, order in orders.items():
            base = f"{module}.{fused}."
            for lora, suffix in (("lora_A", "weight"), ("lora_B", "weight"), ("lora_B", "weight_qkv")):
                if name != f"{base}{lora}.{suffix}":
                    continue
                pieces = [out.pop(f"{base}{lora}.weight_{p}") for p in order if f"{base}{lora}.weight_{p}" in out]
                if not pieces:
                    continue
                if lora == "lora_A":
                    if any(not torch.equal(p, pieces[0]) for p in pieces[1:]):
                        pieces = [torch.full_like(pieces[0], float("nan"))]  # cannot come from one shared lora_A
                    out[name] = pieces[0]
                else:
                    out[name] = torch.cat(pieces, dim=0)
    return out


def _first_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"shape/dtype {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
    diff = (a.contiguous().view(-1).view(torch.uint8) != b.contiguous().view(-1).view(torch.uint8)).nonzero()
    if not len(diff):
        return ""
    return f"first differing byte at offset {int(diff[0])} of {a.nbytes}"


def verify_targets(targets, output_root: str | os.PathLike, dtype: torch.dtype | None = None) -> VerifyResult:
    start = time.perf_counter()
    count = nbytes = 0
    for target in targets:
        directory = check_inside(output_root, Path(output_root) / target.subdir)
        opened = open_output(directory, target.kind)  # extra tensors: `check_loadable`
        for plan in target.groups:
            stage, group = plan.stage, plan.group
            originals = {}
            for name, tensor_plan in plan.outputs:
                if tensor_plan.name not in opened:
                    raise CheckpointError(f"{directory}: consolidated output lacks tensor '{tensor_plan.name}'")
                originals[name] = opened[tensor_plan.name].load()
            module = group.specs[0].module_fully_qualified_name if group.specs else None
            orders = _fused_orders(group.specs[0]) if group.specs else {}
            for tp_rank, path in enumerate(stage.rank_files):
                derived = checked(
                    lambda: adapt_state_dict(group.specs, originals, tp_rank, stage.parameters), stage, "re-sharding"
                )
                derived = _to_saved_layout(derived, group.names, module, orders)
                for name in group.names:
                    actual = stage.tensors[tp_rank][name].load()
                    if dtype is not None and actual.is_floating_point():
                        actual = actual.to(dtype)
                    expected = derived.get(name)
                    if expected is None:
                        raise CheckpointError(f"{path}: tensor '{name}' cannot be re-derived from {directory}")
                    problem = _first_difference(actual, expected)
                    if problem:
                        raise CheckpointError(
                            f"{path}: tensor '{name}' differs from the one re-derived from {directory} ({problem})"
                        )
                    count += 1
                    nbytes += actual.nbytes
    return VerifyResult(count, nbytes, time.perf_counter() - start)
