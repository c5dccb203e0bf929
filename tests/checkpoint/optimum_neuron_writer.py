"""Write checkpoints in the optimum-neuron training layout (docs/checkpoint_formats.md section 3), for tests and benchmarks.

Rank files are written one at a time from any iterable of ``((tp_rank, pp_rank), state_dict)`` pairs, so a caller
that builds each state dict lazily (a generator) writes a checkpoint of any size with one rank in memory.

An adapter is written as optimum-neuron's ``NeuronPeftModel.save_pretrained`` writes it: every rank-file key, metadata
parameter name and spec module name starts with the PEFT wrapper prefix ``base_model.model.`` (callers pass names as in
the model; the writer adds it). ``tests/checkpoint/test_optimum_neuron_sample.py`` pins this against a checkpoint that
optimum-neuron itself wrote.

The xser reference file must name the class ``torch_xla.utils.serialization.TensorReference`` without torch_xla being
importable: a pure-Python pickler writes that GLOBAL opcode for our marker class, leaving ``sys.modules`` untouched.
"""

from __future__ import annotations

import json
import os
import pickle
import types
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import torch

from optimum_neuron_peft.errors import CheckpointError
from optimum_neuron_peft.transformations.names import ADAPTER_CONFIG_NAME, PEFT_WRAPPER_PREFIX
from optimum_neuron_peft.checkpoint.optimum_neuron import (
    ADAPTER_PREFIX,
    ADAPTER_SHARDS_DIR,
    MODEL_SHARDS_DIR,
    RANK_FILES_DIR,
    metadata_file_name,
    rank_file_name,
    xser_tensor_file,
)

_XSER_MODULE = "torch_xla.utils.serialization"
_XSER_CLASS = "TensorReference"
MARKER_FILES = ("checkpoint", "done")


class _TensorReferenceToSave:
    """Pickled under torch_xla's module and class name with state ``{"tid": tid}``, like the real one."""

    def __init__(self, tid: int) -> None:
        self.tid = tid


class _XserReferencePickler(pickle._Pickler):  # type: ignore[name-defined]
    """Pure-Python pickler (the C one cannot be taught a global name) that writes our marker class as torch_xla's."""

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if obj is _TensorReferenceToSave:
            self.write(pickle.GLOBAL + f"{_XSER_MODULE}\n{_XSER_CLASS}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


_XSER_PICKLE_MODULE = types.ModuleType("optimum_neuron_peft_xser_pickle")
_XSER_PICKLE_MODULE.Pickler = _XserReferencePickler  # type: ignore[attr-defined]


def write_xser_rank_file(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Write ``path`` as torch_xla's xser does: references in ``path``, tensor i in ``path.tensors/tensor_<i>.pt``."""
    path = Path(path)
    tensors_dir = xser_tensor_file(path, 0).parent
    tensors_dir.mkdir(parents=True, exist_ok=True)
    references = {}
    for tid, (name, tensor) in enumerate(state_dict.items()):
        torch.save(tensor, xser_tensor_file(path, tid))
        references[name] = _TensorReferenceToSave(tid)
    torch.save(references, path, pickle_module=_XSER_PICKLE_MODULE)


def write_rank_file(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], serialization: str) -> None:
    if serialization == "plain":
        torch.save(dict(state_dict), path)
    elif serialization == "xser":
        write_xser_rank_file(path, state_dict)
    else:
        raise CheckpointError(f"expected serialization 'plain' or 'xser', found {serialization!r}")


def write_metadata(path: str | os.PathLike, metadata: Mapping[str, Any]) -> None:
    """JSON for ``.json`` paths; ``torch.save`` (the old format) for ``.pt`` paths."""
    path = Path(path)
    if path.suffix == ".pt":
        torch.save(dict(metadata), path)
    else:
        path.write_text(json.dumps(metadata, indent=2), encoding="utf-8")


def with_peft_wrapper_prefix(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Stage metadata named as in the model -> named from the PEFT wrapper, as in optimum-neuron's adapter files."""
    out = dict(metadata)
    if "parameters" in metadata:
        out["parameters"] = {PEFT_WRAPPER_PREFIX + name: entry for name, entry in metadata["parameters"].items()}
    if "model_weight_transformation_specs" in metadata:
        out["model_weight_transformation_specs"] = [
            {**group, "module_fully_qualified_name": PEFT_WRAPPER_PREFIX + group["module_fully_qualified_name"]}
            for group in metadata["model_weight_transformation_specs"]
        ]
    return out


def write_optimum_neuron_checkpoint(
    root: str | os.PathLike,
    rank_state_dicts: Mapping[tuple[int, int], Mapping[str, torch.Tensor]]
    | Iterable[tuple[tuple[int, int], Mapping[str, torch.Tensor]]],
    metadata_per_pp: Mapping[int, Mapping[str, Any]],
    serialization: Literal["plain", "xser"] = "plain",
    adapter_name: str | None = None,
    adapter_config: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    metadata_format: Literal["json", "pt"] = "json",
) -> Path:
    """Write the model shards (``adapter_name=None``) or one adapter's shards under ``root``; return the shards dir.

    ``rank_state_dicts`` maps or yields ``(tp_rank, pp_rank) -> {name: tensor}``; each is written and released before
    the next is asked for. ``config`` goes to ``root/config.json``, ``adapter_config`` to the adapter directory.
    Names are given as in the model; an adapter's are written with the PEFT wrapper prefix (module docstring).
    """
    root = Path(root)
    items = rank_state_dicts.items() if isinstance(rank_state_dicts, Mapping) else rank_state_dicts
    if adapter_name is None:
        shards = root / MODEL_SHARDS_DIR
    else:
        shards = root / f"{ADAPTER_PREFIX}{adapter_name}" / ADAPTER_SHARDS_DIR
        metadata_per_pp = {pp: with_peft_wrapper_prefix(meta) for pp, meta in metadata_per_pp.items()}
        items = ((key, {PEFT_WRAPPER_PREFIX + name: t for name, t in state.items()}) for key, state in items)
    (shards / RANK_FILES_DIR).mkdir(parents=True, exist_ok=True)
    if config is not None:
        (root / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    if adapter_name is not None and adapter_config is not None:
        (shards.parent / ADAPTER_CONFIG_NAME).write_text(json.dumps(adapter_config, indent=2), encoding="utf-8")
    for pp_rank, metadata in metadata_per_pp.items():
        write_metadata(shards / metadata_file_name(pp_rank, metadata_format), metadata)
    for (tp_rank, pp_rank), state_dict in items:
        write_rank_file(shards / RANK_FILES_DIR / rank_file_name(tp_rank, pp_rank), state_dict, serialization)
        del state_dict  # let a generator's state dict be freed before the next one is built
    for marker in MARKER_FILES:
        (shards / marker).touch()
    return shards
