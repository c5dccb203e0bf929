"""Model-level weight transformations: apply every spec of a model, and shard or gather the other parameters.

These are the functions loading, saving, consolidation and resharding are built on. They are pure: the tp rank is
an argument, tp sizes come from the specs and the parameters metadata.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch

from ..errors import SpecError
from .base import CustomModule, ModelWeightTransformationSpecs
from .metadata import model_transformation_specs, parameter_metadata
from .names import normalize_parameters_metadata, without_peft_prefix
from .sharding import create_local_weight_with_padding, materialize, unshard_tensors

SpecsSource = torch.nn.Module | Iterable[ModelWeightTransformationSpecs]


def specialize_transformation_specs_for_model(model: torch.nn.Module) -> None:
    """Give every spec of ``model`` its module's fully qualified name and its current PEFT type."""
    for name, module in model.named_modules():
        if not isinstance(module, CustomModule):
            continue
        module.specs.module_fully_qualified_name = without_peft_prefix(name)
        for spec in module.specs:
            spec.peft_type = spec.guess_peft_type(model, name)


def _specs_of(source: SpecsSource) -> list[ModelWeightTransformationSpecs]:
    return model_transformation_specs(source) if isinstance(source, torch.nn.Module) else list(source)


def model_parameters_metadata(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    return normalize_parameters_metadata({n: parameter_metadata(p) for n, p in model.named_parameters()})


def adapt_state_dict(
    model_or_specs: SpecsSource,
    state_dict: Mapping[str, Any],
    tp_rank: int,
    parameters_metadata: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    strict: bool = True,
) -> dict[str, torch.Tensor]:
    """Original weights (full tensors or lazy slices) -> the local weights of ``tp_rank`` in the custom layout.

    Spec-covered weights go through their spec; the others are sharded along their ``partition_dim`` (padded when
    not divisible) or copied whole. With ``strict``, original names that match no parameter are an error.
    """
    if parameters_metadata is None:
        if not isinstance(model_or_specs, torch.nn.Module):
            raise SpecError("adapt_state_dict: parameters_metadata is required when passing specs instead of a model")
        parameters_metadata = model_parameters_metadata(model_or_specs)
    else:
        parameters_metadata = normalize_parameters_metadata(parameters_metadata)
    local: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for specs in _specs_of(model_or_specs):
        spec_local, spec_consumed = specs.adapt_state_dict(state_dict, tp_rank)
        local.update(spec_local)
        consumed.update(spec_consumed)
    unexpected = []
    for name, tensor in state_dict.items():
        if name in consumed:
            continue
        entry = parameters_metadata.get(name)
        if entry is None:
            unexpected.append(name)
            continue
        if entry.get("tensor_model_parallel"):
            local[name] = create_local_weight_with_padding(
                tensor, entry["partition_dim"], entry.get("partition_stride", 1), entry["num_partitions"], tp_rank,
                name=name,
            )
        else:
            local[name] = materialize(tensor)
    if unexpected and strict:
        raise SpecError(
            f"adapt_state_dict: {len(unexpected)} tensors match no parameter of the model, e.g. {unexpected[:5]}"
        )
    return local


def to_original_weights(
    transformation_specs: Iterable[ModelWeightTransformationSpecs],
    sharded_state_dicts: Mapping[str, Sequence[torch.Tensor]],
    parameters_metadata: Mapping[str, Mapping[str, Any]],
    *,
    adapter_name: str | None = None,
    full_sizes: Mapping[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """{name: [tensor per rank]} (names as saved: no adapter name) -> the original Transformers weights.

    ``parameters_metadata`` may name parameters with adapter names and ``base_layer`` (as optimum-neuron writes
    it); with ``adapter_name`` only that adapter's entries are used. ``full_sizes`` trims padding of sharded
    dimensions (e.g. a vocabulary padded to a multiple of tp).
    """
    metadata = normalize_parameters_metadata(parameters_metadata, adapter_name)
    original: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for specs in transformation_specs:
        spec_original, spec_consumed = specs.to_original_weights(sharded_state_dicts, metadata)
        original.update(spec_original)
        consumed.update(spec_consumed)
    for name, shards in sharded_state_dicts.items():
        if name in consumed:
            continue
        entry = metadata.get(name)
        if entry is None:
            raise SpecError(f"{name}: saved tensor has no entry in the parameters metadata")
        original[name] = gather_parameter(name, shards, entry, (full_sizes or {}).get(name))
    return original


def gather_parameter(
    name: str, shards: Sequence[torch.Tensor], entry: Mapping[str, Any], full_size: int | None = None
) -> torch.Tensor:
    """Rebuild one parameter that no spec covers from its per-rank tensors and metadata entry."""
    if not entry.get("tensor_model_parallel"):
        return shards[0]
    if len(shards) != entry["num_partitions"]:
        raise SpecError(
            f"{name}: metadata says num_partitions={entry['num_partitions']}, found tensors from {len(shards)} ranks"
        )
    return unshard_tensors(shards, entry["partition_dim"], entry.get("partition_stride", 1), full_size=full_size, name=name)


__all__ = [
    "adapt_state_dict",
    "gather_parameter",
    "model_parameters_metadata",
    "normalize_parameters_metadata",
    "specialize_transformation_specs_for_model",
    "to_original_weights",
]
