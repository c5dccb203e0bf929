"""Optimizer state in ORIGINAL names, so that a checkpoint resumes at any tp / dp size.

Per-parameter state tensors shaped like their parameter (Adam's ``exp_avg`` / ``exp_avg_sq``, SGD's momentum)
are consolidated through the same specs as the adapter (`consolidate_adapter`: slicing and permutations only, so
bit-exact) and re-sliced on load (`local_adapter_tensors`). Scalar state (Adam's ``step``) is the same for every
parameter and is kept once per key. Stored as ``optimizer.safetensors`` (``<state key>/<original name>``) plus
``optimizer.json`` (the param groups' hyper-parameters and the scalars): nothing is unpickled on load.

A ZeRO-1 optimizer (`parallel.zero`) is gathered to its full state first (`full_optimizer_state_dict`) and loaded
with `load_full_optimizer_state_dict`, so a checkpoint does not depend on the dp size nor on ZeRO-1 being on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import CheckpointError
from ..parallel.zero import full_optimizer_state_dict, load_full_optimizer_state_dict
from ..peft.config import unwrap_model
from ..peft.model import adapter_metadata, consolidate_adapter, local_adapter_tensors, model_tp
from ..transformations.names import get_adapter_name, remove_adapter_name

OPTIMIZER_WEIGHTS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"


def _local_names(model: nn.Module, adapter: str) -> dict[int, str]:
    inner = unwrap_model(model)
    return {id(p): remove_adapter_name(n) for n, p in inner.named_parameters() if get_adapter_name(n) == adapter}


def _ordered_params(optimizer: torch.optim.Optimizer) -> list[list[nn.Parameter]]:
    return [list(group["params"]) for group in optimizer.param_groups]


def _unwrap(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer under accelerate's ``AcceleratedOptimizer`` (which keeps it as ``.optimizer``)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def consolidated_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, adapter: str = "default"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors ``<key>/<original name>``, json-able rest) on data-parallel rank 0; ({}, {}) on the others.
    Collective over the data-parallel group (ZeRO-1 gather) and the tensor-parallel group."""
    optimizer = _unwrap(optimizer)
    full = full_optimizer_state_dict(optimizer)
    if full is None:  # not dp rank 0: the whole tp group of this replica skips the tp gather below
        return {}, {}
    names = _local_names(model, adapter)
    tensor_state: dict[str, dict[str, torch.Tensor]] = {}
    scalars: dict[str, Any] = {}
    params = [p for group in _ordered_params(optimizer) for p in group]
    for index, param in enumerate(params):
        if id(param) not in names:
            raise CheckpointError(f"checkpoint: the optimizer holds a parameter outside adapter {adapter!r}; "
                                  "checkpoints hold the optimizer state of one trained adapter")  # fmt: skip
        for key, value in (full["state"].get(index) or {}).items():
            if torch.is_tensor(value) and value.shape == param.shape and value.dim() > 0:
                tensor_state.setdefault(key, {})[names[id(param)]] = value.detach().contiguous()
            else:
                scalar = value.item() if torch.is_tensor(value) else value
                dtype = str(value.dtype).removeprefix("torch.") if torch.is_tensor(value) else None
                if key in scalars and scalars[key]["value"] != scalar:
                    raise CheckpointError(f"optimizer state {key!r} differs between parameters; cannot reshard it")
                scalars[key] = {"value": scalar, "dtype": dtype}
    tp = model_tp(model)
    metadata = adapter_metadata(model, adapter)
    tensors: dict[str, torch.Tensor] = {}
    for key in sorted(tensor_state):
        local = tensor_state[key]
        if tp.is_parallel:
            gathered: list[Any] = [None] * tp.size
            dist.all_gather_object(gathered, local, group=tp.group)
        else:
            gathered = [local]
        for name, value in consolidate_adapter(gathered, metadata, adapter).items():
            tensors[f"{key}/{name}"] = value.clone().contiguous()
    hyper = [{k: v for k, v in group.items() if k != "params"} for group in full["param_groups"]]
    return tensors, {"param_groups": hyper, "scalars": scalars, "tensor_keys": sorted(tensor_state)}


def save_optimizer_state(directory: Path, tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(directory / OPTIMIZER_WEIGHTS))
    (directory / OPTIMIZER_JSON).write_text(json.dumps(rest, indent=1, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    if torch.is_tensor(value):
        return value.tolist()
    raise TypeError(f"optimizer hyper-parameter of type {type(value).__name__} cannot be saved")


def load_optimizer_state(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, adapter: str = "default"
) -> None:
    """Load what `save_optimizer_state` wrote into ``optimizer``, re-sliced for this rank's layout (a ZeRO-1
    optimizer keeps its own shard)."""
    from safetensors.torch import load_file

    weights, meta = directory / OPTIMIZER_WEIGHTS, directory / OPTIMIZER_JSON
    if not weights.is_file() or not meta.is_file():
        raise CheckpointError(f"{directory}: expected {OPTIMIZER_WEIGHTS} and {OPTIMIZER_JSON} (a checkpoint of "
                              "optimum_neuron_peft.training.Trainer)")  # fmt: skip
    rest = json.loads(meta.read_text())
    saved = load_file(str(weights))
    optimizer = _unwrap(optimizer)
    groups = _ordered_params(optimizer)
    if len(rest["param_groups"]) != len(groups):
        raise CheckpointError(f"{meta}: {len(rest['param_groups'])} parameter groups, the optimizer has {len(groups)}")
    local: dict[str, dict[str, torch.Tensor]] = {}
    for key in rest["tensor_keys"]:
        original = {n.split("/", 1)[1]: t for n, t in saved.items() if n.split("/", 1)[0] == key}
        local[key] = {name: t for name, (_, t) in local_adapter_tensors(model, original, adapter).items()}
    names = _local_names(model, adapter)
    state: dict[int, dict[str, Any]] = {}
    param_groups = []
    index = 0
    for group, hyper in zip(groups, rest["param_groups"]):
        ids = []
        for param in group:
            entry = {key: local[key][names[id(param)]] for key in rest["tensor_keys"]}
            for key, scalar in rest["scalars"].items():
                value = scalar["value"]
                entry[key] = torch.tensor(value, dtype=getattr(torch, scalar["dtype"])) if scalar["dtype"] else value
            if entry:
                state[index] = entry
            ids.append(index)
            index += 1
        param_groups.append({**_restore_tuples(hyper, optimizer), "params": ids})
    load_full_optimizer_state_dict(optimizer, {"state": state, "param_groups": param_groups})


def _restore_tuples(hyper: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """JSON turned tuples (Adam's betas) into lists; give them back the type the optimizer uses."""
    current = optimizer.param_groups[0]
    return {k: tuple(v) if isinstance(v, list) and isinstance(current.get(k), tuple) else v for k, v in hyper.items()}
