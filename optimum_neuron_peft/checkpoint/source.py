"""A sharded checkpoint (ours or optimum-neuron's) as stages of validated, lazily read tensor groups.

A *group* is the unit of streaming: the saved tensors one `ModelWeightTransformationSpecs` touches (e.g. q/k/v and
o_proj of one attention block), or one parameter no spec covers (see `grouping`). Consolidation, verification and
resharding load one group from every rank at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, OptimumNeuronPeftError
from ..transformations import ModelWeightTransformationSpecs, parse_metadata
from ..transformations.names import normalize_parameters_metadata, remove_base_layer
from .detect import Checkpoint, open_checkpoint, source_format_of  # noqa: F401 (re-exported)
from .adapter_targets import lora_module_of  # noqa: F401 (re-exported)
from .grouping import Group, check_ranks_agree, group_tensors
from ..formats.lazy_tensor import LazyTensor, open_safetensors
from .optimum_neuron import ShardedPart, open_rank_file, strip_key_prefix
from .optimum_neuron import normalize_parameters_metadata as normalize_quirks


def dry_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor of ``shape`` that takes no memory (one element, expanded): used to run specs for shapes only.

    Meta tensors would do the same, but the first ``torch.cat`` on meta tensors imports torch._dynamo (seconds).
    """
    return torch.zeros((), dtype=dtype).expand(tuple(shape))


@dataclass
class Stage:
    pp_rank: int
    metadata_file: Path
    rank_files: list[Path]  # one per tp rank
    tensors: list[dict[str, LazyTensor]]  # one per tp rank, keyed by saved name
    parameters: dict[str, dict[str, Any]]  # keyed by saved name (no adapter name, no base_layer)
    specs: list[ModelWeightTransformationSpecs]
    groups: list[Group] = field(default_factory=list)
    # The metadata as read, in training names (adapter names kept, PEFT wrapper prefix removed, optimum-neuron's
    # quirks normalized): what a re-sharded copy of this stage starts from.
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)

    def load(self, group: Group) -> dict[str, list[torch.Tensor]]:
        return {name: [ranks[name].load() for ranks in self.tensors] for name in group.names}

    def dry(self, group: Group) -> dict[str, list[torch.Tensor]]:
        """Stand-ins of the group's tensors with the right shapes and dtypes (see `dry_tensor`)."""
        return {name: [dry_tensor(ranks[name].shape, ranks[name].dtype) for ranks in self.tensors] for name in group.names}

    def nbytes(self, group: Group) -> int:
        return sum(ranks[name].nbytes for name in group.names for ranks in self.tensors)


@dataclass
class Part:
    """The model's shards or one adapter's, opened and checked."""

    adapter_name: str | None
    tp_size: int
    pp_size: int
    stages: list[Stage]
    directory: Path
    adapter_config: Path | None
    source_format: str  # "optimum-neuron-peft" or "optimum-neuron"

    @property
    def all_specs(self) -> list[ModelWeightTransformationSpecs]:
        return [s for stage in self.stages for s in stage.specs]


def _open_any_rank_file(path: Path) -> dict[str, LazyTensor]:
    return open_safetensors(path) if path.suffix == ".safetensors" else open_rank_file(path)


def open_part(part: ShardedPart, source_format: str) -> Part:
    stages = [_open_stage(part, pp, source_format) for pp in range(part.pp_size)]
    seen: dict[str, Path] = {}
    for stage in stages:
        for name in stage.tensors[0]:
            if name in seen:
                raise CheckpointError(f"{stage.rank_files[0]}: tensor '{name}' is also saved by stage file {seen[name]}")
            seen[name] = stage.rank_files[0]
    return Part(part.adapter_name, part.tp_size, part.pp_size, stages, part.directory, part.adapter_config, source_format)


def _open_stage(part: ShardedPart, pp: int, source_format: str) -> Stage:
    metadata_file = part.metadata_files[pp]
    metadata = part.metadata[pp]
    if source_format == "optimum-neuron":
        try:
            metadata = normalize_quirks(metadata, part.tp_size)
        except CheckpointError as err:
            raise CheckpointError(f"{metadata_file}: {err}") from None
    try:
        parameters, specs = parse_metadata(metadata, where=str(metadata_file))
    except OptimumNeuronPeftError as err:
        raise CheckpointError(str(err) if str(metadata_file) in str(err) else f"{metadata_file}: {err}") from None
    parameters = normalize_parameters_metadata(parameters, part.adapter_name)
    for group in specs:
        for spec in group:
            spec_tp = getattr(spec, "tp_size", part.tp_size)
            if spec_tp != part.tp_size:
                raise CheckpointError(
                    f"{metadata_file}: {type(spec).__name__} of {group.module_fully_qualified_name} says "
                    f"tp_size={spec_tp}, but the checkpoint has {part.tp_size} tp rank files"
                )
    rank_files = [part.rank_files[(tp, pp)] for tp in range(part.tp_size)]
    tensors = []
    for path in rank_files:
        opened = strip_key_prefix(_open_any_rank_file(path), part.key_prefix, path)
        if part.adapter_name is None:
            renamed = {remove_base_layer(k): v for k, v in opened.items()}
            if len(renamed) != len(opened):
                raise CheckpointError(f"{path}: holds a tensor both with and without 'base_layer' in its name")
            opened = renamed
        tensors.append(opened)
    check_ranks_agree(rank_files, tensors)
    stage = Stage(pp, metadata_file, rank_files, tensors, parameters, specs, metadata=metadata)
    stage.groups = _groups(stage)
    return stage


def _groups(stage: Stage) -> list[Group]:
    claims = [(specs.module_fully_qualified_name, specs.get_relevant_parameter_names(), specs) for specs in stage.specs]
    return group_tensors(stage.tensors[0], claims, stage.parameters, stage.metadata_file, stage.rank_files[0])


def checked(call, stage: Stage, what: str):
    """Run ``call()``; a spec/shape error becomes a `CheckpointError` naming the stage's files."""
    try:
        return call()
    except CheckpointError:
        raise
    except (OptimumNeuronPeftError, RuntimeError) as err:
        raise CheckpointError(
            f"{stage.rank_files[0]}: {what} failed, the tensors disagree with {stage.metadata_file.name}: {err}"
        ) from None


def select_parts(checkpoint: Checkpoint, adapter: str | None, source_format: str) -> list[Part]:
    if adapter is not None:
        if adapter not in checkpoint.adapters:
            raise CheckpointError(
                f"{checkpoint.root}: no adapter named {adapter!r}; adapters found: {sorted(checkpoint.adapters) or 'none'}"
            )
        return [open_part(checkpoint.adapters[adapter], source_format)]
    parts = [open_part(checkpoint.model, source_format)] if checkpoint.model is not None else []
    parts += [open_part(p, source_format) for _, p in sorted(checkpoint.adapters.items())]
    return parts
