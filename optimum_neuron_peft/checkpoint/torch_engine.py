"""Streaming consolidation: sharded checkpoint (ours or optimum-neuron's) -> Transformers / PEFT directories.

Plan, then stream. Opening the checkpoint validates every file and groups the saved tensors (see `source`); the
plan runs every group through its spec on meta tensors, which yields every output name, dtype and shape (and
catches metadata that disagrees with the files) before any data is read or any output exists. Then, one group
at a time: read the group's tensors from every rank (exact byte ranges, nothing else of the file), rebuild the
original weights, cast if asked, append them to their output shard, free them. Peak memory is about twice the
largest group (its shards plus the rebuilt weights), whatever the model size.

Output layout (``OUTPUT_DIR``):

- model only, or ``--adapter NAME``, or a single adapter without model: that directory at ``OUTPUT_DIR``;
- model and adapters: the model at ``OUTPUT_DIR``, each adapter at ``OUTPUT_DIR/<adapter name>/``;
- several adapters without model: ``OUTPUT_DIR/<adapter name>/`` each.

The torch engine. Two engines write the same bytes: `consolidate` (torch-free, the public entry point) chooses between
`torch_free` (a checkpoint consolidated as saved: declared provenance, byte copies, no torch import) and this one,
and says why.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from tqdm import tqdm

from ..errors import CheckpointError
from ..transformations.model import to_original_weights
from ..transformations.names import ADAPTER_CONFIG_NAME, PEFT_WRAPPER_PREFIX
from ..utils.atomic import atomic_output_dir
from ..utils.safe_paths import check_inside
from .byte_copy import Buffers, RangeCopier, SourceFiles, gather_columns, read_ranges_into, row_ranges
from ..transformations.pieces import ColumnGather, Provenance, RowCopy
from .config_shapes import check_config_shapes
from .declared import GroupShapes, Unsupported, group_outputs
from .engine_common import SLEEP_ENV, ConsolidateOptions, ConsolidationResult, copy_root_files
from .hf_output import WeightsWriter
from .adapter_targets import AdapterGroup, fused_names_of, shared_lora_projections
from .adapter_targets import restore_adapter_config as restore_adapter_config_of
from .loadability import check_adapter_keys, check_model_keys
from .source import Group, Part, Stage, checked, open_checkpoint, select_parts, source_format_of
from .stream_writer import TensorPlan

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}  # fmt: skip
__all__ = ["consolidate_with_torch", "plan_consolidation"]


@dataclass
class GroupPlan:
    stage: Stage
    group: Group
    outputs: list[tuple[str, TensorPlan]]  # (original name as produced by the spec, planned output tensor)
    provenance: dict[str, Provenance] = field(default_factory=dict)  # original name -> where its bytes are


@dataclass
class TargetPlan:
    """One output directory: the model (Transformers) or one adapter (PEFT)."""

    part: Part
    subdir: str
    groups: list[GroupPlan]
    adapter_config: dict[str, Any] | None = None

    @property
    def kind(self) -> Literal["model", "adapter"]:
        return "model" if self.part.adapter_name is None else "adapter"

    @property
    def plans(self) -> list[TensorPlan]:
        return [plan for g in self.groups for _, plan in g.outputs]


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise CheckpointError(f"dtype {dtype!r} is not supported; expected one of bf16, fp16, fp32") from None


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def original_weights(stage: Stage, group: Group, shards: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    return to_original_weights(group.specs, shards, stage.parameters)


# ---------------------------------------------------------------------------------------------------------------------
# Planning


def _group_key(stage: Stage, group: Group) -> tuple | None:
    """Groups of the same structure (every decoder layer's attention, every MLP...) have the same output shapes
    once names are taken relative to the module: the key of that structure, None for a parameter without spec."""
    if not group.specs:
        return None
    module = group.specs[0].module_fully_qualified_name
    specs = json.dumps([[[type(s).__name__, s.to_dict()] for s in g] for g in group.specs], sort_keys=True)
    inputs = tuple(
        (name[len(module):], tuple(stage.tensors[0][name].shape), stage.tensors[0][name].dtype,
         json.dumps(stage.parameters.get(name), sort_keys=True))
        for name in group.names
    )
    return module, specs, inputs


def _output_shapes(stage: Stage, group: Group, cache: dict) -> tuple[list[tuple[str, tuple[int, ...], torch.dtype]], dict[str, Provenance]]:
    """(original name, shape, dtype) of every tensor the group rebuilds, and the byte provenance of those that are
    pure data moves (see `provenance`), without reading data. Groups of the same structure share one derivation."""
    key = _group_key(stage, group)
    if key is None:
        (name,) = group.names
        lazy, entry = stage.tensors[0][name], stage.parameters[name]
        shape = list(lazy.shape)
        if entry.get("tensor_model_parallel"):
            if not 0 <= entry["partition_dim"] < len(shape):
                raise CheckpointError(f"{stage.metadata_file}: '{name}' has partition_dim {entry['partition_dim']} but is {len(shape)}-D in {stage.rank_files[0].name}")
            shape[entry["partition_dim"]] *= len(stage.tensors)
        module, structure = name, ("parameter", tuple(lazy.shape), lazy.dtype, json.dumps(entry, sort_keys=True))
        shapes = [("", tuple(shape), lazy.dtype)]
    else:
        module, structure = key[0], key[1:]
        shapes = None
    if structure not in cache:
        if shapes is None:
            dry = checked(lambda: original_weights(stage, group, stage.dry(group)), stage, "rebuilding the original weights")
            if any(not n.startswith(module) for n in dry):
                raise CheckpointError(f"{stage.metadata_file}: the specs of {module} produce tensors outside the module")
            shapes = [(n[len(module):], tuple(t.shape), t.dtype) for n, t in dry.items()]
        cache[structure] = (shapes, _derive_provenance(stage, group, module, shapes))
    shapes, provenance = cache[structure]
    return [(module + rel, shape, dtype) for rel, shape, dtype in shapes], {module + rel: p for rel, p in provenance.items()}


def _derive_provenance(stage: Stage, group: Group, module: str, shapes) -> dict[str, Provenance]:
    """Byte provenance keyed by output name relative to ``module``: the specs' piece maps (`declared.group_outputs`,
    the same maps the specs' ``to_original_weights`` execute), for the outputs whose shape and dtype are the
    planned ones. None for a group whose specs have no piece map or refuse its shapes: it takes the tensor path."""
    tensors = stage.tensors[0]
    group_shapes = GroupShapes(group.names, {n: tuple(tensors[n].shape) for n in group.names}, len(stage.tensors))
    specs = [spec for container in group.specs for spec in container]
    module_name = group.specs[0].module_fully_qualified_name if group.specs else None
    try:
        outputs = group_outputs(module_name, specs, group_shapes, stage.parameters)
    except Unsupported:
        return {}
    planned = {rel: (tuple(shape), dtype) for rel, shape, dtype in shapes}
    found = {}
    for output in outputs:
        rel = output.name[len(module):]
        if planned.get(rel) == (output.shape, tensors[group.names[output.source]].dtype):
            found[rel] = output.provenance
    return found


def plan_part(part: Part, dtype: torch.dtype | None) -> list[GroupPlan]:
    plans = []
    seen: dict[str, Path] = {}
    cache: dict = {}
    prefix = "" if part.adapter_name is None else PEFT_WRAPPER_PREFIX
    for stage in part.stages:
        for group in stage.groups:
            outputs = []
            shapes, provenance = _output_shapes(stage, group, cache)
            for name, shape, tensor_dtype in shapes:
                out = prefix + name
                if out in seen:
                    raise CheckpointError(f"{stage.rank_files[0]}: output tensor '{out}' is produced twice")
                seen[out] = stage.rank_files[0]
                cast = dtype if dtype is not None and tensor_dtype.is_floating_point else tensor_dtype
                outputs.append((name, TensorPlan(out, cast, shape)))
            plans.append(GroupPlan(stage, group, outputs, provenance))
    return plans


def _fused_names(part: Part) -> list[tuple[str, tuple[str, ...]]]:
    return list(dict.fromkeys(n for specs in part.all_specs for n in fused_names_of(specs)))


def restore_adapter_config(part: Part, groups: list[GroupPlan]) -> dict[str, Any]:
    """The checkpoint's ``adapter_config.json`` with ``target_modules`` in original names, checked against the
    LoRA tensors (`adapter_targets.restore_adapter_config`); the outputs it drops are removed from ``groups``."""
    fused = _fused_names(part)
    adapter_groups = [
        AdapterGroup(
            plan.stage.rank_files[0],
            set().union(*(shared_lora_projections(s.module_fully_qualified_name, fused_names_of(s), plan.group.names) for s in plan.group.specs)),
            [name for name, _ in plan.outputs],
        )
        for plan in groups
    ]
    config, kept = restore_adapter_config_of(part.adapter_config, fused, adapter_groups)
    for plan, names in zip(groups, kept):
        keep = set(names)
        plan.outputs = [(name, tensor_plan) for name, tensor_plan in plan.outputs if name in keep]
    return config


def plan_consolidation(
    checkpoint_dir: str | os.PathLike, *, adapter: str | None = None, dtype: str | torch.dtype | None = None,
    check_checksums: bool = False,
) -> tuple[Any, list[TargetPlan]]:
    checkpoint = open_checkpoint(checkpoint_dir, check_checksums=check_checksums)
    parts = select_parts(checkpoint, adapter, source_format_of(checkpoint))
    cast = parse_dtype(dtype)
    has_model = any(p.adapter_name is None for p in parts)
    at_root = has_model or len(parts) == 1
    targets = []
    for part in parts:
        subdir = "" if part.adapter_name is None or (at_root and not has_model) else part.adapter_name
        groups = plan_part(part, cast)
        target = TargetPlan(part, subdir, groups)
        if part.adapter_name is not None:
            target.adapter_config = restore_adapter_config(part, groups)
        targets.append(target)
    check_config_shapes(checkpoint.config_file, ((p.name, p.shape) for t in targets for p in t.plans))
    return checkpoint, targets


# ---------------------------------------------------------------------------------------------------------------------
# Streaming


def stream_target(
    target: TargetPlan, directory: Path, writer: WeightsWriter, dtype: torch.dtype | None, on_bytes: Callable[[int], None],
    files: SourceFiles | None = None,
) -> int:
    """Write every output tensor of ``target``: by byte-range copies where its provenance is known, else through
    the tensor path (read the group's shards, `to_original_weights`, cast)."""
    sleep = float(os.environ.get(SLEEP_ENV, "0") or 0)
    files = files if files is not None else SourceFiles()
    copier = RangeCopier(files)
    buffers = Buffers()
    count = 0
    for plan in target.groups:
        if not plan.outputs:
            continue
        lazies = [[ranks[name] for ranks in plan.stage.tensors] for name in plan.group.names]
        original = None  # the group rebuilt in memory, only if some output needs the tensor path
        for name, tensor_plan in plan.outputs:
            if not _write_from_bytes(plan.provenance.get(name), lazies, tensor_plan, writer, files, copier, buffers):
                if original is None:
                    shards = plan.stage.load(plan.group)
                    original = checked(lambda: original_weights(plan.stage, plan.group, shards), plan.stage, "rebuilding the original weights")
                    del shards
                writer.write(tensor_plan.name, _cast(original.pop(name), dtype))
            on_bytes(tensor_plan.nbytes)
            count += 1
        del original
        if sleep:
            time.sleep(sleep)
    return count


def _write_from_bytes(
    provenance: Provenance | None, lazies, plan: TensorPlan, writer: WeightsWriter, files: SourceFiles, copier: RangeCopier,
    buffers: Buffers,
) -> bool:
    """Write one output from its byte provenance; False when it has none usable (the caller takes the tensor path)."""
    if isinstance(provenance, RowCopy):
        ranges = row_ranges(provenance, lazies)
        if ranges is None:
            return False
        source_dtype = lazies[provenance.pieces[0][0]][0].dtype if provenance.pieces else plan.dtype
        if source_dtype == plan.dtype and writer.can_copy_ranges:
            writer.copy_ranges(plan.name, ranges, copier)  # file to file, in the kernel
            return True
        tensor = torch.empty(plan.shape, dtype=source_dtype)
        read_ranges_into(files, ranges, tensor)
    elif isinstance(provenance, ColumnGather):
        source_dtype = lazies[provenance.pieces[0][0]][0].dtype
        # A safetensors writer copies the bytes out at once, so the output memory can be reused; pytorch keeps it.
        reuse = writer.can_copy_ranges or source_dtype != plan.dtype
        tensor = buffers.get("out", plan.shape, source_dtype) if reuse else torch.empty(plan.shape, dtype=source_dtype)
        if not gather_columns(files, provenance, lazies, tensor, buffers):
            return False
    else:
        return False
    writer.write(plan.name, _cast(tensor, plan.dtype))
    return True


@contextlib.contextmanager
def _torch_threads(count: int):
    """Run with ``count`` torch intra-op threads: the copies here are memory-bound, and a second thread contending
    for the memory bus (and for the core the kernel's write-back runs on) made them ~4x slower on a 2-core VM."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def consolidate_with_torch(checkpoint_dir: Path, output_dir: Path, options: ConsolidateOptions) -> ConsolidationResult:
    """The torch engine: `consolidate.consolidate` (which checked the arguments) with tensor math where it is needed."""
    format, max_shard_size, overwrite, progress = options.format, options.max_shard_size, options.overwrite, options.progress
    dtype, adapter, check_checksums, verify = options.dtype, options.adapter, options.check_checksums, options.verify
    cast = parse_dtype(dtype)
    start = time.perf_counter()
    checkpoint, targets = plan_consolidation(checkpoint_dir, adapter=adapter, dtype=cast, check_checksums=check_checksums)
    total = sum(p.nbytes for t in targets for p in t.plans)
    count = 0
    directories = {}
    with atomic_output_dir(output_dir, overwrite=overwrite, inputs=[checkpoint_dir]) as tmp:
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="consolidate", disable=not progress) as bar:
            for target in targets:
                directory = check_inside(tmp, tmp / target.subdir if target.subdir else tmp)
                directory.mkdir(parents=True, exist_ok=True)
                writer = WeightsWriter(directory, target.plans, kind=target.kind, format=format, max_shard_size=max_shard_size)
                try:
                    with SourceFiles() as files, _torch_threads(1):
                        count += stream_target(target, directory, writer, cast, bar.update, files)
                    writer.close()
                except BaseException:
                    writer.abort()
                    raise
                names = [plan.name for plan in target.plans]
                if target.kind == "model":
                    copy_root_files([checkpoint.config_file, *checkpoint.extra_files], directory)
                    if checkpoint.config_file is not None:
                        check_model_keys(names, checkpoint.config_file, output_dir / target.subdir)
                else:
                    (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(target.adapter_config, indent=2) + "\n")
                    check_adapter_keys(names, directory, checkpoint.config_file, output_dir / target.subdir)
                directories["model" if target.kind == "model" else target.part.adapter_name] = output_dir / target.subdir
        if verify:
            from .rederive import verify_targets

            verify_targets(targets, tmp, dtype=cast)
    return ConsolidationResult(output_dir, count, total, time.perf_counter() - start, directories)
