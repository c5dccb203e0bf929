"""Planning a consolidation (model and/or adapters) without torch: every output tensor, its shape, and where its bytes are.

The torch engine (`source`, `consolidate.plan_part`) builds spec objects, runs them on dry tensors for the output
shapes and on index tensors for the byte provenance. This does the same from the files' headers and the metadata's
*declared* layouts (`declared`): rank files are read as `stored_tensor.StoredTensor` records (safetensors headers, or
`optimum_neuron.scan_rank_file` for optimum-neuron's plain ``torch.save`` files and xser reference + tensor files),
grouped as the torch engine groups them (`grouping`), and each group's outputs declared in the torch engine's order.

It takes only what it can vouch for: plain, xser or safetensors rank files, registered specs with valid fields,
shapes that agree with the metadata, dense tensors, no LoRA tensor in the model's shards. An adapter's
``adapter_config.json`` and the outputs it keeps come from `adapter_targets`, as in the torch engine. Anything else raises
`declared.Unsupported`, and any file error `CheckpointError`: the caller then leaves the checkpoint to the torch
engine, which reports errors with its established messages.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..transformations.names import PEFT_WRAPPER_PREFIX, is_lora_parameter, normalize_parameters_metadata, remove_base_layer
from .adapter_targets import AdapterGroup, fused_names_of, restore_adapter_config, shared_lora_projections
from .config_shapes import check_config_shapes
from .declared import DeclaredSpec, GroupShapes, Unsupported, check_parameter_entry, declared_spec, group_outputs
from .detect import Checkpoint, open_checkpoint, source_format_of
from ..formats.dtypes import itemsize
from .grouping import check_ranks_agree, group_tensors
from .optimum_neuron import ShardedPart, scan_rank_file, strip_key_prefix
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
class PartPlan:
    """One output directory: the model (``adapter_name`` None) or one adapter, at ``subdir`` of the output."""

    adapter_name: str | None
    subdir: str
    groups: list[list[PlannedTensor]]  # in output order; a group's tensors are rebuilt from the same saved tensors
    adapter_config: dict[str, Any] | None = None  # the published adapter_config.json (`adapter_targets`)

    @property
    def tensors(self) -> list[PlannedTensor]:
        return [t for group in self.groups for t in group]


@dataclass
class ModelPlan:
    """A whole consolidation: every output directory, in the torch engine's order (model first, adapters by name)."""

    checkpoint: Checkpoint
    parts: list[PartPlan]

    @property
    def groups(self) -> list[list[PlannedTensor]]:
        return [group for part in self.parts for group in part.groups]

    @property
    def tensors(self) -> list[PlannedTensor]:
        return [t for group in self.groups for t in group]

    def source_of(self, part: PartPlan) -> ShardedPart:
        """The checkpoint's sharded part ``part`` is planned from: its rank files, metadata and tp size."""
        return self.checkpoint.model if part.adapter_name is None else self.checkpoint.adapters[part.adapter_name]


def plan_model(checkpoint_dir: str | os.PathLike, *, adapter: str | None = None, check_checksums: bool = False) -> ModelPlan:
    """The plan of consolidating ``checkpoint_dir`` (only ``adapter`` when given), in the torch engine's layout
    (`torch_engine` docstring): `Unsupported` for what this planner does not vouch for, `CheckpointError` for a
    file it refuses."""
    checkpoint = open_checkpoint(checkpoint_dir, check_checksums=check_checksums)
    if adapter is not None:
        if adapter not in checkpoint.adapters:
            raise CheckpointError(f"{checkpoint.root}: no adapter named {adapter!r}")  # the torch engine reports it
        parts = [checkpoint.adapters[adapter]]
    else:
        parts = [checkpoint.model] if checkpoint.model is not None else []
        parts += [p for _, p in sorted(checkpoint.adapters.items())]
    has_model = any(p.adapter_name is None for p in parts)
    at_root = has_model or len(parts) == 1
    planned = []
    for part in parts:
        subdir = "" if part.adapter_name is None or (at_root and not has_model) else part.adapter_name
        groups, fused, droppable = _plan_part(part, source_format_of(checkpoint))
        plan = PartPlan(part.adapter_name, subdir, groups)
        if part.adapter_name is not None:
            _restore_adapter(plan, part, fused, droppable)
        planned.append(plan)
    plan = ModelPlan(checkpoint, planned)
    check_config_shapes(checkpoint.config_file, ((t.name, t.shape) for t in plan.tensors))
    return plan


def _plan_part(part: ShardedPart, source_format: str) -> tuple[list[list[PlannedTensor]], list, list[tuple[Path, set[str]]]]:
    """(the part's output groups, its fused module names, per group: its rank file and the projections a shared
    LoRA tensor of it serves)."""
    groups: list[list[PlannedTensor]] = []
    fused: list = []
    droppable: list[tuple[Path, set[str]]] = []
    saved: set[str] = set()
    for pp in range(part.pp_size):
        names, stage_groups, stage_fused, stage_droppable = _plan_stage(part, pp, source_format)
        if saved & names:
            raise Unsupported(f"'{sorted(saved & names)[0]}' is saved by two pipeline stages")
        saved |= names
        groups += stage_groups
        fused += stage_fused
        droppable += stage_droppable
    outputs = [t.name for group in groups for t in group]
    if len(set(outputs)) != len(outputs):
        raise Unsupported("an output tensor is produced twice")
    return groups, list(dict.fromkeys(fused)), droppable


def _restore_adapter(plan: PartPlan, part: ShardedPart, fused: list, droppable: list[tuple[Path, set[str]]]) -> None:
    """``adapter_config.json`` in original names and the outputs it keeps (`adapter_targets`, as the torch engine),
    output names with PEFT's wrapper prefix."""
    if part.adapter_config is None:
        raise Unsupported(f"adapter {part.adapter_name!r} has no adapter_config.json")  # the torch engine reports it
    groups = [
        AdapterGroup(rank_file, shared, [t.name for t in group]) for (rank_file, shared), group in zip(droppable, plan.groups)
    ]
    config, kept = restore_adapter_config(part.adapter_config, fused, groups)
    plan.groups = [
        [dataclasses.replace(t, name=PEFT_WRAPPER_PREFIX + t.name) for t in group if t.name in keep]
        for group, keep in zip(plan.groups, map(set, kept))
    ]
    plan.adapter_config = config


def _rank_file(path: Path, part: ShardedPart) -> dict[str, StoredTensor]:
    tensors = read_safetensors_header(path) if path.suffix == ".safetensors" else scan_rank_file(path)  # plain or xser
    tensors = strip_key_prefix(tensors, part.key_prefix, path)
    if part.adapter_name is not None:  # an adapter's names are kept as saved (`source`)
        return {name: stored.renamed(name) for name, stored in tensors.items()}
    renamed = {remove_base_layer(name): stored.renamed(remove_base_layer(name)) for name, stored in tensors.items()}
    if len(renamed) != len(tensors):
        raise Unsupported(f"{path}: a tensor is saved both with and without 'base_layer' in its name")
    if any(is_lora_parameter(name) for name in renamed):
        raise Unsupported(f"{path}: the model shards hold LoRA tensors")
    return renamed


def declared_specs_of(metadata: dict[str, Any], tp_size: int) -> list[tuple[str, list[DeclaredSpec]]]:
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


def _plan_stage(part: ShardedPart, pp: int, source_format: str) -> tuple[set[str], list[list[PlannedTensor]], list, list[tuple[Path, set[str]]]]:
    """(the stage's saved names, its output groups in order, its fused module names, per group: its rank file and
    the projections a shared LoRA tensor of it serves)."""
    metadata = part.metadata[pp]
    if source_format == "optimum-neuron":
        metadata = normalize_quirks(metadata, part.tp_size)
    raw = metadata.get("parameters")
    if raw is None:
        raise Unsupported(f"{part.metadata_files[pp]}: no 'parameters'")
    if not isinstance(raw, dict):
        raise Unsupported(f"{part.metadata_files[pp]}: 'parameters' is not a mapping")
    for name, entry in raw.items():
        check_parameter_entry(name, entry, part.tp_size)
    parameters = normalize_parameters_metadata(raw, part.adapter_name)
    modules = declared_specs_of(metadata, part.tp_size)
    rank_files = [part.rank_files[(tp, pp)] for tp in range(part.tp_size)]
    tensors = [_rank_file(path, part) for path in rank_files]
    check_ranks_agree(rank_files, tensors)
    claims = [(module, set().union(*(s.relevant_names(module) for s in specs)), (module, specs)) for module, specs in modules]
    fused = [names for _, specs in modules for names in fused_names_of(specs)]
    planned, droppable = [], []
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
        shared = set().union(*(shared_lora_projections(m, fused_names_of(ss), group.names) for m, ss in group.specs))
        droppable.append((rank_files[0], shared))
    return set(tensors[0]), planned, fused, droppable
