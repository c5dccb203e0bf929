"""Resharding: a sharded checkpoint (ours or optimum-neuron's) or a Transformers directory (Llama, Mistral, Qwen3,
Granite; laid out by the parallel plan) -> our sharded format at another tensor-parallel size, streaming one group
at a time.

Each group is rebuilt into its original weights (exactly as consolidation does) and immediately re-sharded through
the same specs re-targeted at the new tp size; every new rank file is planned up front (shapes from zero-memory stand-in tensors)
and appended to group by group, so memory stays at about the size of one group. The pipeline-parallel split is
kept. The output is always our format (safetensors rank files, JSON metadata, manifest with checksums).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from ..errors import CheckpointError
from ..transformations import ModelWeightTransformationSpecs
from ..transformations.model import adapt_state_dict, normalize_parameters_metadata
from ..transformations.names import ADAPTER_CONFIG_NAME, add_adapter_name, remove_adapter_name, split_lora_name
from ..transformations.parallel_plan import COLUMN, FAMILIES, lora_partition_dim, replicated, sharded
from ..utils.atomic import atomic_output_dir, check_output_dir
from ..utils.safe_paths import check_inside
from ..utils.schema import read_json
from .schemas import ADAPTER_CONFIG_SCHEMA, MODEL_CONFIG_SCHEMA, read_index_files
from .torch_engine import original_weights
from ..formats.lazy_tensor import LazyTensor, open_safetensors
from .optimum_neuron import ROOT_FILES
from .native_format import (
    MANIFEST,
    common_dtype,
    copy_root_files,
    file_record,
    metadata_path,
    part_directory,
    rank_file_path,
    write_json,
    write_manifest,
)
from .source import Part, checked, dry_tensor, open_checkpoint, select_parts, source_format_of
from .stream_writer import FileRecord, SafetensorsStreamWriter, TensorPlan
from .tp_layout import plan_layout


@dataclass
class ReshardResult:
    output_dir: Path
    tp_size: int
    tensors: int
    bytes: int
    seconds: float

    def summary(self) -> str:
        rate = self.bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")
        return (
            f"resharded to tp={self.tp_size}: {self.tensors} rank tensors, {self.bytes / 1e9:.3f} GB in "
            f"{self.seconds:.2f} s ({rate:.2f} GB/s) -> {self.output_dir}"
        )


def retarget_specs(group: ModelWeightTransformationSpecs, tp_size: int) -> ModelWeightTransformationSpecs:
    return ModelWeightTransformationSpecs(group.module_fully_qualified_name, [s.with_tp_size(tp_size) for s in group])


@dataclass
class OriginalGroup:
    """A group of original weights: how to get their shapes (stand-ins) and their data, and the specs re-sharding them."""

    specs: list[ModelWeightTransformationSpecs]
    meta: Callable[[], dict[str, torch.Tensor]]
    load: Callable[[], dict[str, torch.Tensor]]


@dataclass
class OutputStage:
    pp_rank: int
    groups: list[OriginalGroup]
    metadata: dict[str, Any]  # as written (training names)
    parameters: dict[str, dict[str, Any]]  # normalized, keyed like saved tensors


def _entry_for_new_name(name: str, tp_size: int) -> dict[str, Any]:
    """Metadata of a name only the new specs produce: a per-projection LoRA of a fused column-parallel module."""
    split = split_lora_name(name)
    dim = lora_partition_dim(COLUMN, split[1]) if split is not None else 0
    return replicated() if dim is None else sharded(dim, tp_size)


def _write_stage(root: Path, stage: OutputStage, tp_size: int, adapter_name: str | None, on_bytes, dtypes: set) -> tuple[dict[str, FileRecord], int]:
    # Plan every rank file: run each group through the new specs on stand-in tensors.
    plans: list[list[TensorPlan]] = [[] for _ in range(tp_size)]
    for group in stage.groups:
        originals = group.meta()
        for rank in range(tp_size):
            local = adapt_state_dict(group.specs, originals, rank, stage.parameters)
            plans[rank] += [TensorPlan.of(n, t) for n, t in local.items()]
    records: dict[str, FileRecord] = {}
    writers = [
        SafetensorsStreamWriter(rank_file_path(root, r, stage.pp_rank, adapter_name), plans[r], {"format": "pt"}, hash=True)
        for r in range(tp_size)
    ]
    count = 0
    try:
        for group in stage.groups:
            originals = group.load()
            for rank, writer in enumerate(writers):
                local = adapt_state_dict(group.specs, originals, rank, stage.parameters)
                for name, tensor in local.items():
                    writer.write(name, tensor)
                    if tensor.is_floating_point():
                        dtypes.add(tensor.dtype)
                    on_bytes(tensor.nbytes)
                    count += 1
                del local
            del originals
        for rank, writer in enumerate(writers):
            path = rank_file_path(root, rank, stage.pp_rank, adapter_name)
            records[path.relative_to(root).as_posix()] = writer.close()
    finally:
        for writer in writers:
            writer.abort()
    path = metadata_path(root, stage.pp_rank, adapter_name)
    records[path.relative_to(root).as_posix()] = write_json(path, stage.metadata)
    return records, count


# ---------------------------------------------------------------------------------------------------------------------
# Sources


def _stages_from_part(part: Part, tp_size: int) -> list[OutputStage]:
    stages = []
    for stage in part.stages:
        metadata = json.loads(json.dumps(stage.metadata))  # a deep copy, edited below
        new_specs = {id(g): retarget_specs(g, tp_size) for g in stage.specs}
        groups = []
        for group in stage.groups:
            def meta(stage=stage, group=group):
                return checked(lambda: original_weights(stage, group, stage.dry(group)), stage, "rebuilding the original weights")

            def load(stage=stage, group=group):
                return original_weights(stage, group, stage.load(group))

            groups.append(OriginalGroup([new_specs[id(g)] for g in group.specs], meta, load))
        # New metadata: old entries with the new num_partitions, and entries for names the new specs produce.
        params = {}
        for name, entry in metadata["parameters"].items():
            entry = dict(entry)
            if entry.get("tensor_model_parallel"):
                entry["num_partitions"] = tp_size
            params[name] = entry
        metadata = {"parameters": params, "model_weight_transformation_specs": [new_specs[id(g)].to_metadata() for g in stage.specs]}
        out = OutputStage(stage.pp_rank, groups, metadata, normalize_parameters_metadata(params, part.adapter_name))
        stages.append(out)
    return stages


def _transformers_stages(directory: Path, tp_size: int) -> tuple[list[OutputStage], dict[str, Any]]:
    config = read_json(directory / "config.json", MODEL_CONFIG_SCHEMA, error=CheckpointError)
    if config.get("model_type") not in FAMILIES:
        raise CheckpointError(
            f"{directory / 'config.json'}: model_type {config.get('model_type')!r} cannot be sharded from a Transformers "
            f"directory; supported: {', '.join(sorted(FAMILIES))}"
        )
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = read_index_files(index)
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{directory}: expected model.safetensors or model.safetensors.index.json")
    tensors: dict[str, LazyTensor] = {}
    for file in files:
        tensors.update(open_safetensors(directory / file))
    try:
        layout = plan_layout(config, tp_size)
    except Exception as err:
        raise CheckpointError(f"{directory / 'config.json'}: {err}") from None
    order = {n: i for i, n in enumerate(tensors)}
    groups = []
    claimed = set()

    def group_of(names, specs):
        def meta():
            return {n: dry_tensor(tensors[n].shape, tensors[n].dtype) for n in names}

        def load():
            return {n: tensors[n].load() for n in names}

        return OriginalGroup(specs, meta, load)

    for specs in layout.specs:
        names = sorted(specs.get_relevant_parameter_names() & tensors.keys(), key=order.__getitem__)
        claimed.update(names)
        if names:
            groups.append((order[names[0]], group_of(names, [specs])))
    for name in tensors:
        if name not in claimed:
            if name not in layout.parameters:
                raise CheckpointError(f"{directory}: tensor '{name}' is not a parameter of the {config['model_type']} layout")
            groups.append((order[name], group_of([name], [])))
    groups.sort(key=lambda item: item[0])
    stage = OutputStage(0, [g for _, g in groups], layout.metadata(0), normalize_parameters_metadata(layout.parameters))
    return [stage], config


def _is_transformers_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / MANIFEST).exists() and not (path / "shards").exists() and (
        (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    )


def reshard(
    checkpoint_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    tp_size: int,
    overwrite: bool = False,
    progress: bool = False,
) -> ReshardResult:
    """Write ``checkpoint_dir`` (sharded, any format, or a Transformers directory of one of the four families) as
    our sharded format at ``tp_size``, atomically. Bit-exact: consolidating the result gives the same tensors as consolidating the input."""
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    if not isinstance(tp_size, int) or tp_size < 1:
        raise CheckpointError(f"--tp-size must be a positive integer, got {tp_size!r}")
    check_output_dir(output_dir, overwrite, inputs=[checkpoint_dir])
    start = time.perf_counter()
    parts: list[tuple[str | None, list[OutputStage], Path | None]] = []
    if _is_transformers_dir(checkpoint_dir):
        stages, _ = _transformers_stages(checkpoint_dir, tp_size)
        parts.append((None, stages, None))
        root_files = [checkpoint_dir / "config.json"] + [checkpoint_dir / n for n in ROOT_FILES if (checkpoint_dir / n).is_file()]
    else:
        checkpoint = open_checkpoint(checkpoint_dir)
        for part in select_parts(checkpoint, None, source_format_of(checkpoint)):
            parts.append((part.adapter_name, _stages_from_part(part, tp_size), part.adapter_config))
        root_files = [p for p in [checkpoint.config_file, *checkpoint.extra_files] if p is not None]
    for _, _, adapter_config in parts:  # copied as it is: validated as consolidation will read it
        if adapter_config is not None:
            read_json(adapter_config, ADAPTER_CONFIG_SCHEMA, error=CheckpointError)
    # Validate the new layout before any output exists: plans run every group through the new specs.
    pp_size = max(len(stages) for _, stages, _ in parts)
    for adapter_name, stages, _ in parts:
        for stage in stages:
            saved: set[str] = set()
            for group in stage.groups:
                originals = group.meta()
                for name, entry in stage.parameters.items():
                    if name in originals and entry.get("tensor_model_parallel") and not any(name in g.get_relevant_parameter_names() for g in group.specs):
                        size = originals[name].shape[entry["partition_dim"]]
                        if size % (tp_size * entry.get("partition_stride", 1)):
                            raise CheckpointError(
                                f"{name}: dimension {entry['partition_dim']} of size {size} cannot be split evenly over tp_size={tp_size}"
                            )
                try:
                    local = adapt_state_dict(group.specs, originals, 0, stage.parameters)
                except CheckpointError:
                    raise
                except Exception as err:
                    raise CheckpointError(f"{checkpoint_dir}: cannot reshard to tp_size={tp_size}: {err}") from None
                saved.update(local)
                for name in local:
                    if name not in stage.parameters:
                        entry = _entry_for_new_name(name, tp_size)
                        stage.parameters[name] = entry
                        key = add_adapter_name(name, adapter_name) if adapter_name else name
                        stage.metadata["parameters"].setdefault(key, entry)
            # Drop LoRA entries the new layout does not save (optimum-neuron's shared lora_A / fused lora_B names).
            stage.metadata["parameters"] = {
                k: v for k, v in stage.metadata["parameters"].items()
                if split_lora_name(remove_adapter_name(k)) is None or remove_adapter_name(k) in saved
            }
    total = 0
    count = 0
    dtypes: set = set()
    with atomic_output_dir(output_dir, overwrite=overwrite, inputs=[checkpoint_dir]) as tmp:
        records = copy_root_files(tmp, None, root_files)
        with tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="reshard", disable=not progress) as bar:
            def on_bytes(n: int) -> None:
                nonlocal total
                total += n
                bar.update(n)

            for adapter_name, stages, adapter_config in parts:
                if adapter_name is not None:
                    target = check_inside(tmp, part_directory(tmp, adapter_name).parent / ADAPTER_CONFIG_NAME)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(adapter_config, target)
                    records[target.relative_to(tmp).as_posix()] = file_record(target)
                for stage in stages:
                    stage_records, n = _write_stage(tmp, stage, tp_size, adapter_name, on_bytes, dtypes)
                    records.update(stage_records)
                    count += n
        write_manifest(
            tmp, records, tp_size=tp_size, pp_size=pp_size, dtype=common_dtype(dtypes),
            has_model=any(a is None for a, _, _ in parts), adapters=[a for a, _, _ in parts if a is not None],
        )
    return ReshardResult(output_dir, tp_size, count, total, time.perf_counter() - start)
