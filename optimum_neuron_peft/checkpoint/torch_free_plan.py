"""Planning a full-model consolidation without torch: every output tensor, its shape, and where its bytes are.

The torch engine (`source`, `consolidate.plan_part`) builds spec objects, runs them on dry tensors for the output
shapes and on index tensors for the byte provenance. This does the same from the files' headers and the metadata's
*declared* layouts (`declared`): rank files are read as `stored_tensor.StoredTensor` records (safetensors headers, or
`optimum_neuron.scan_rank_file` for optimum-neuron's plain ``torch.save`` files and xser reference + tensor files),
grouped as the torch engine groups them (`grouping`), and each group's outputs declared in the torch engine's order.

It takes only what it can vouch for: the model alone (no adapter), plain, xser or safetensors rank files, registered
specs with valid fields, shapes that agree with the metadata, dense tensors. Anything else raises
`declared.Unsupported`, and any file error `CheckpointError`: the caller then leaves the checkpoint to the torch
engine, which reports errors with its established messages.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..transformations.names import is_lora_parameter, normalize_parameters_metadata, remove_base_layer
from .config_shapes import check_config_shapes
from .declared import DeclaredSpec, GroupShapes, Unsupported, check_parameter_entry, declared_spec, group_outputs
from .detect import Checkpoint, open_checkpoint, source_format_of
from ..formats.dtypes import itemsize
from .grouping import check_ranks_agree, group_tensors
from .optimum_neuron import ShardedPart, scan_rank_file
from .optimum_neuron import normalize_parameters_metadata as normalize_quirks
from ..transformations.pieces import Provenance
from ..formats.stored_tensor import StoredTensor, read_safetensors_header


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its bytes are ``provenance`` over ``sources[k][r]`` (saved tensor k of the group, rank r)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    provenance: Provenance
    sources: tuple[tuple[StoredTensor, ...], ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


@dataclass
class ModelPlan:
    checkpoint: Checkpoint
    groups: list[list[PlannedTensor]]  # in output order; a group's tensors are rebuilt from the same saved tensors

    @property
    def tensors(self) -> list[PlannedTensor]:
        return [t for group in self.groups for t in group]


def plan_model(checkpoint_dir: str | os.PathLike, *, check_checksums: bool = False) -> ModelPlan:
    checkpoint = open_checkpoint(checkpoint_dir, check_checksums=check_checksums)
    if checkpoint.model is None or checkpoint.adapters:
        raise Unsupported("the checkpoint holds adapters (or no model)")
    part = checkpoint.model
    groups: list[list[PlannedTensor]] = []
    saved: set[str] = set()
    for pp in range(part.pp_size):
        names, stage_groups = _plan_stage(part, pp, source_format_of(checkpoint))
        if saved & names:
            raise Unsupported(f"'{sorted(saved & names)[0]}' is saved by two pipeline stages")
        saved |= names
        groups += stage_groups
    outputs = [t.name for group in groups for t in group]
    if len(set(outputs)) != len(outputs):
        raise Unsupported("an output tensor is produced twice")
    plan = ModelPlan(checkpoint, groups)
    check_config_shapes(checkpoint.config_file, ((t.name, t.shape) for t in plan.tensors))
    return plan


def _rank_file(path: Path) -> dict[str, StoredTensor]:
    tensors = read_safetensors_header(path) if path.suffix == ".safetensors" else scan_rank_file(path)  # plain or xser
    renamed = {remove_base_layer(name): stored.renamed(remove_base_layer(name)) for name, stored in tensors.items()}
    if len(renamed) != len(tensors):
        raise Unsupported(f"{path}: a tensor is saved both with and without 'base_layer' in its name")
    if any(is_lora_parameter(name) for name in renamed):
        raise Unsupported(f"{path}: the model shards hold LoRA tensors")
    return renamed


def _specs(metadata: dict[str, Any], tp_size: int) -> list[tuple[str, list[DeclaredSpec]]]:
    modules = []
    for entry in metadata.get("model_weight_transformation_specs", []):
        if not isinstance(entry, dict) or not isinstance(entry.get("module_fully_qualified_name"), str):
            raise Unsupported(f"spec entry {entry!r}")
        if not isinstance(entry.get("specs"), list):
            raise Unsupported(f"spec entry {entry!r}")
        specs = []
        for item in entry["specs"]:
            if not (isinstance(item, (list, tuple)) and len(item) == 2):
                raise Unsupported(f"spec entry {item!r}")
            spec = declared_spec(*item)
            if spec.tp_size != tp_size:
                raise Unsupported(f"a spec says tp_size={spec.tp_size}, the checkpoint has {tp_size} ranks")
            specs.append(spec)
        modules.append((entry["module_fully_qualified_name"], specs))
    return modules


def _plan_stage(part: ShardedPart, pp: int, source_format: str) -> tuple[set[str], list[list[PlannedTensor]]]:
    """(the stage's saved names, its output groups in order)."""
    metadata = part.metadata[pp]
    if source_format == "optimum-neuron":
        metadata = normalize_quirks(metadata, part.tp_size)
    raw = metadata.get("parameters")
    if raw is None:
        raise Unsupported(f"{part.metadata_files[pp]}: no 'parameters'")
    for name, entry in raw.items():
        check_parameter_entry(name, entry, part.tp_size)
    parameters = normalize_parameters_metadata(raw)
    modules = _specs(metadata, part.tp_size)
    rank_files = [part.rank_files[(tp, pp)] for tp in range(part.tp_size)]
    tensors = [_rank_file(path) for path in rank_files]
    check_ranks_agree(rank_files, tensors)
    claims = [(module, set().union(*(s.relevant_names(module) for s in specs)), (module, specs)) for module, specs in modules]
    planned = []
    for group in group_tensors(tensors[0], claims, parameters, part.metadata_files[pp], rank_files[0]):
        module, specs = group.specs[0] if group.specs else (None, [])
        shapes = GroupShapes(group.names, {n: tensors[0][n].shape for n in group.names}, part.tp_size)
        sources = tuple(tuple(ranks[n] for ranks in tensors) for n in group.names)
        outputs = group_outputs(module, specs, shapes, parameters)
        for output in outputs:
            for k, r, _, _ in output.provenance.pieces:
                if not sources[k][r].is_dense():
                    raise Unsupported(f"{sources[k][r].file}: '{sources[k][r].name}' is not dense")
        planned.append([
            PlannedTensor(o.name, sources[o.source][0].dtype, o.shape, o.provenance, sources) for o in outputs
        ])
    return set(tensors[0]), planned
