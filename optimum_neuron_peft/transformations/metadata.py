"""Tensor-parallel parameter metadata in the schema of docs/checkpoint_formats.md section 3, and its (de)serialization.

    {"parameters": {name: {"tensor_model_parallel": true, "partition_dim": 0, "partition_stride": 1,
                           "num_partitions": 4} | {"tensor_model_parallel": false}},
     "model_weight_transformation_specs": [{"module_fully_qualified_name": ..., "specs": [[ClassName, {...}]]}]}
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

import torch

from ..errors import SpecError
from ..utils.schema import parse_json
from .base import CustomModule, ModelWeightTransformationSpecs
from .names import remove_adapter_name, remove_base_layer

TP_ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "partition_stride", "num_partitions")


def get_tensor_model_parallel_attributes(tensor: torch.Tensor) -> dict[str, Any]:
    """The four tensor-parallel attributes of a parameter, or {} when it has none."""
    if not hasattr(tensor, "tensor_model_parallel"):
        return {}
    # neuronx-distributed always sets all four; a non-sharded parameter may carry only the flag.
    defaults = {"tensor_model_parallel": False, "partition_dim": -1, "partition_stride": 1, "num_partitions": 1}
    return {attr: getattr(tensor, attr, defaults[attr]) for attr in TP_ATTRIBUTES}


def parameter_metadata(param: torch.Tensor) -> dict[str, Any]:
    attributes = get_tensor_model_parallel_attributes(param)
    if attributes.get("tensor_model_parallel"):
        return {
            "tensor_model_parallel": True,
            "partition_dim": int(attributes["partition_dim"]),
            "partition_stride": int(attributes["partition_stride"]),
            "num_partitions": int(attributes["num_partitions"]),
        }
    return {"tensor_model_parallel": False}


def model_transformation_specs(model: torch.nn.Module) -> list[ModelWeightTransformationSpecs]:
    """The specs of every `CustomModule` of ``model`` (call `specialize_transformation_specs_for_model` first)."""
    return [module.specs for _, module in model.named_modules() if isinstance(module, CustomModule) and len(module.specs)]


def create_parameter_metadata(
    model: torch.nn.Module, parameters_for_current_stage: Iterable[str] | None = None
) -> dict[str, Any]:
    """Metadata of ``model``'s parameters and specs; with pipeline parallelism, only this stage's parameters."""
    stage = None if parameters_for_current_stage is None else set(parameters_for_current_stage)
    parameters = {
        name: parameter_metadata(param)
        for name, param in model.named_parameters()
        if stage is None or name in stage
    }
    stage_names = None if stage is None else {remove_base_layer(remove_adapter_name(n)) for n in stage}
    specs = []
    for specs_of_module in model_transformation_specs(model):
        entry = specs_of_module.to_metadata(stage_names)
        if entry["specs"]:
            specs.append(entry)
    return {"parameters": parameters, "model_weight_transformation_specs": specs}


def _check_parameter_entry(name: str, entry: Any, where: str) -> None:
    if not isinstance(entry, Mapping) or "tensor_model_parallel" not in entry:
        raise SpecError(f"{where}: parameter {name!r} needs a 'tensor_model_parallel' entry, found {entry!r}")
    if entry["tensor_model_parallel"]:
        missing = [a for a in TP_ATTRIBUTES if a not in entry]
        if missing:
            raise SpecError(f"{where}: sharded parameter {name!r} is missing {missing}")
        if entry["partition_dim"] not in (0, 1):
            raise SpecError(f"{where}: parameter {name!r} has partition_dim {entry['partition_dim']}, expected 0 or 1")


def parse_metadata(
    metadata: Mapping[str, Any], *, where: str = "metadata"
) -> tuple[dict[str, dict[str, Any]], list[ModelWeightTransformationSpecs]]:
    """Validate a metadata dict and return (parameters, specs), specs built through the spec registry."""
    if not isinstance(metadata, Mapping) or "parameters" not in metadata:
        raise SpecError(f"{where}: expected a dict with 'parameters' and 'model_weight_transformation_specs'")
    parameters = metadata["parameters"]
    if not isinstance(parameters, Mapping):
        raise SpecError(f"{where}: 'parameters' must map names to attributes, found {type(parameters).__name__}")
    for name, entry in parameters.items():
        _check_parameter_entry(name, entry, where)
    entries = metadata.get("model_weight_transformation_specs", [])
    if not isinstance(entries, list):
        raise SpecError(f"{where}: 'model_weight_transformation_specs' must be a list, found {type(entries).__name__}")
    specs = [ModelWeightTransformationSpecs.from_metadata(entry, where=where) for entry in entries]
    return {name: dict(entry) for name, entry in parameters.items()}, specs


def metadata_to_json(metadata: Mapping[str, Any]) -> str:
    return json.dumps(metadata, indent=2, sort_keys=False)


def metadata_from_json(text: str, *, where: str = "metadata") -> dict[str, Any]:
    data = parse_json(text, file=where, error=SpecError)  # strict: bounded nesting, no duplicate keys, no NaN
    parse_metadata(data, where=where)
    return data
