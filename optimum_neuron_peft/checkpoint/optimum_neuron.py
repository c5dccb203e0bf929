"""Discover and read optimum-neuron training checkpoints (docs/checkpoint_formats.md section 3) without loading tensor data.

Layout (``<part>`` is ``shards/`` for the model, ``adapter_<name>/adapter_shards/`` for each LoRA adapter)::

    <ckpt>/config.json, tokenizer files
    <part>/mp_metadata_pp_rank_<P>.json  (or .pt in old checkpoints)
    <part>/model/dp_rank_00_tp_rank_<TT>_pp_rank_<PP>.pt        plain torch.save, or xser reference file
    <part>/model/dp_rank_00_tp_rank_<TT>_pp_rank_<PP>.pt.tensors/tensor_<i>.pt   (xser only)

Quirks kept as they are on disk (the consolidation layer deals with them): a fused ``weight_qkv``/``bias_qkv`` is
recorded as not tensor-parallel although it is sharded along dim 0 (see :func:`normalize_parameters_metadata`);
``fuse_axis`` is 0/1 or "column"/"row"; adapter rank files name tensors WITHOUT the adapter name while the metadata
names them WITH it (see :func:`adapter_key_from_metadata_name`).

One thing is normalized at discovery: an adapter checkpoint names everything from the PEFT wrapper
(``base_model.model.model.layers.0...``: rank-file keys, metadata parameter names, every spec module name; see
docs/checkpoint_formats.md, "Adapter naming"). :func:`strip_peft_wrapper_prefix` removes that prefix from the
metadata and records it in ``ShardedPart.key_prefix``, so that an adapter part is named like the model
(``model.layers.0...``) everywhere downstream, as in the project's own format; rank-file keys are stripped when the
files are opened (:func:`strip_key_prefix`).
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import CheckpointError
from ..transformations.names import ADAPTER_CONFIG_NAME, PEFT_WRAPPER_PREFIX
from ..utils.safe_paths import check_safe_name
from ..utils.schema import read_json, validate
from .schemas import METADATA_SCHEMA
from ..formats.stored_tensor import StoredTensor
from ..formats.torch_zip import (
    TensorReference,
    load_plain_pickle,
    scan_torch_references,
    scan_torch_tensor,
)

if TYPE_CHECKING:
    from ..formats.lazy_tensor import LazyTensor

Serialization = Literal["plain", "xser"]

MODEL_SHARDS_DIR = "shards"
ADAPTER_PREFIX = "adapter_"
ADAPTER_SHARDS_DIR = "adapter_shards"
RANK_FILES_DIR = "model"
XSER_TENSORS_SUFFIX = ".tensors"

_METADATA_RE = re.compile(r"mp_metadata_pp_rank_(\d+)\.(json|pt)")
_RANK_FILE_RE = re.compile(r"dp_rank_(\d{2})_tp_rank_(\d{2})_pp_rank_(\d{2})\.pt")
# Root files consolidation copies next to the weights, when present.
ROOT_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def metadata_file_name(pp_rank: int, suffix: str = "json") -> str:
    return f"mp_metadata_pp_rank_{pp_rank}.{suffix}"


def rank_file_name(tp_rank: int, pp_rank: int, dp_rank: int = 0) -> str:
    return f"dp_rank_{dp_rank:02d}_tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:02d}.pt"


def xser_tensor_file(rank_file: Path, tid: int) -> Path:
    return Path(f"{rank_file}{XSER_TENSORS_SUFFIX}") / f"tensor_{tid}.pt"


# ---------------------------------------------------------------------------------------------------------------------
# Description of a checkpoint


@dataclass(frozen=True)
class ShardedPart:
    """The model's shards or one adapter's shards: every file needed to read them, validated."""

    directory: Path
    adapter_name: str | None
    tp_size: int
    pp_size: int
    serialization: Serialization
    metadata_files: dict[int, Path]  # pp rank -> metadata file
    rank_files: dict[tuple[int, int], Path]  # (tp rank, pp rank) -> rank file
    metadata: dict[int, dict] = field(repr=False)  # pp rank -> parsed metadata (PEFT wrapper prefix removed)
    adapter_config: Path | None = None
    key_prefix: str = ""  # prefix of every rank-file key, removed when the files are opened (`strip_key_prefix`)


@dataclass(frozen=True)
class OptimumNeuronCheckpoint:
    """A discovered optimum-neuron checkpoint: the model shards (if saved), each adapter, and root files."""

    root: Path
    model: ShardedPart | None
    adapters: dict[str, ShardedPart]
    config_file: Path | None
    extra_files: tuple[Path, ...]  # generation config and tokenizer files found at the root

    @classmethod
    def discover(cls, path: str | os.PathLike) -> "OptimumNeuronCheckpoint":
        return discover_checkpoint(path)


def discover_checkpoint(path: str | os.PathLike) -> OptimumNeuronCheckpoint:
    """Find and validate every file of the checkpoint rooted at ``path`` (the directory holding ``shards/`` and/or
    ``adapter_<name>/``). Raises :class:`CheckpointError` with one line naming what is missing or inconsistent."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: expected an optimum-neuron checkpoint directory, found {_kind(root)}")
    entries = sorted(p.name for p in root.iterdir())
    if not entries:
        raise CheckpointError(
            f"{root}: expected an optimum-neuron checkpoint (shards/ or adapter_<name>/), found an empty directory"
        )
    if root.name in (MODEL_SHARDS_DIR, ADAPTER_SHARDS_DIR) or (root / RANK_FILES_DIR).is_dir():
        raise CheckpointError(
            f"{root}: this is a shards directory; pass the checkpoint root that contains it ({root.parent})"
        )
    model = _discover_part(root / MODEL_SHARDS_DIR, None) if (root / MODEL_SHARDS_DIR).is_dir() else None
    adapters = {}
    for entry in entries:
        directory = root / entry
        if entry.startswith(ADAPTER_PREFIX) and directory.is_dir() and (directory / ADAPTER_SHARDS_DIR).exists():
            name = check_safe_name(entry[len(ADAPTER_PREFIX) :], what="adapter name", where=directory)
            adapters[name] = _discover_part(directory / ADAPTER_SHARDS_DIR, name)
    if model is None and not adapters:
        shown = ", ".join(entries[:8]) + (", ..." if len(entries) > 8 else "")
        raise CheckpointError(
            f"{root}: expected an optimum-neuron checkpoint with shards/ or adapter_<name>/adapter_shards/, "
            f"found only: {shown}"
        )
    config = root / "config.json"
    extra = tuple(root / name for name in ROOT_FILES if (root / name).is_file())
    return OptimumNeuronCheckpoint(root, model, adapters, config if config.is_file() else None, extra)


def _kind(path: Path) -> str:
    if not path.exists():
        return "nothing (the path does not exist)"
    return "a file" if path.is_file() else "something that is not a directory"


def _discover_part(directory: Path, adapter_name: str | None) -> ShardedPart:
    adapter_config = None
    if adapter_name is not None:
        adapter_config = directory.parent / ADAPTER_CONFIG_NAME
        if not adapter_config.is_file():
            raise CheckpointError(f"{adapter_config}: expected the adapter's LoRA config, the file is missing")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: expected a shards directory, found {_kind(directory)}")
    metadata_files = _find_metadata_files(directory)
    rank_files = _find_rank_files(directory / RANK_FILES_DIR)
    pp_ranks = sorted({pp for _, pp in rank_files})
    pp_size = len(pp_ranks)
    _check_consecutive(pp_ranks, directory / RANK_FILES_DIR, "pipeline stages (pp ranks) of rank files")
    for pp in pp_ranks:
        if pp not in metadata_files:
            raise CheckpointError(
                f"{directory / metadata_file_name(pp)}: expected metadata for pipeline stage {pp} (it has rank "
                f"files), the file is missing"
            )
    for pp, meta_path in metadata_files.items():
        if pp not in pp_ranks:
            raise CheckpointError(
                f"{meta_path}: metadata for pipeline stage {pp} but {directory / RANK_FILES_DIR} has rank files "
                f"for stages 0..{pp_size - 1} only"
            )
    tp_size = _check_tp_ranks(rank_files, pp_ranks, directory / RANK_FILES_DIR)
    metadata = {pp: load_metadata(metadata_files[pp]) for pp in pp_ranks}
    key_prefix = ""
    if adapter_name is not None:
        stripped = {pp: strip_peft_wrapper_prefix(metadata[pp], metadata_files[pp]) for pp in pp_ranks}
        prefixes = {prefix for _, prefix in stripped.values()}
        if len(prefixes) > 1:
            raise CheckpointError(
                f"{directory}: expected every pipeline stage's metadata to name parameters alike, found some with "
                f"the PEFT wrapper prefix '{PEFT_WRAPPER_PREFIX}' and some without"
            )
        metadata = {pp: meta for pp, (meta, _) in stripped.items()}
        key_prefix = prefixes.pop()
    for pp in pp_ranks:
        _check_metadata_tp(metadata[pp], tp_size, metadata_files[pp])
    return ShardedPart(
        directory=directory,
        adapter_name=adapter_name,
        tp_size=tp_size,
        pp_size=pp_size,
        serialization=_serialization_of(rank_files),
        metadata_files={pp: metadata_files[pp] for pp in pp_ranks},
        rank_files=dict(sorted(rank_files.items(), key=lambda item: (item[0][1], item[0][0]))),
        metadata=metadata,
        adapter_config=adapter_config,
        key_prefix=key_prefix,
    )


def _find_metadata_files(directory: Path) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for path in sorted(directory.iterdir()):
        match = _METADATA_RE.fullmatch(path.name)
        if match and path.is_file():
            pp = int(match.group(1))
            # A JSON file wins over an old .pt one for the same stage (sorted order puts .json first).
            found.setdefault(pp, path)
    return found


def _find_rank_files(model_dir: Path) -> dict[tuple[int, int], Path]:
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: expected the directory of rank files, found {_kind(model_dir)}")
    found = {}
    for path in model_dir.iterdir():
        match = _RANK_FILE_RE.fullmatch(path.name)
        # Only data-parallel rank 0 holds the model; `.info.pt` and `.tensors` siblings do not match the pattern.
        if match and int(match.group(1)) == 0 and path.is_file():
            found[(int(match.group(2)), int(match.group(3)))] = path
    if not found:
        raise CheckpointError(
            f"{model_dir}: expected rank files named dp_rank_00_tp_rank_<TT>_pp_rank_<PP>.pt, found none"
        )
    return found


def _check_consecutive(ranks: list[int], where: Path, what: str) -> None:
    if ranks != list(range(len(ranks))):
        missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
        raise CheckpointError(f"{where}: expected {what} 0..{max(ranks)}, found {ranks} (missing {missing})")


def _check_tp_ranks(rank_files: dict[tuple[int, int], Path], pp_ranks: list[int], model_dir: Path) -> int:
    tp_size = max(tp for tp, _ in rank_files) + 1
    for pp in pp_ranks:
        for tp in range(tp_size):
            if (tp, pp) not in rank_files:
                present = sorted(t for t, p in rank_files if p == pp)
                raise CheckpointError(
                    f"{model_dir / rank_file_name(tp, pp)}: missing rank file; expected tp ranks 0..{tp_size - 1} "
                    f"for pp rank {pp}, found {present}"
                )
    return tp_size


def _serialization_of(rank_files: dict[tuple[int, int], Path]) -> Serialization:
    # xser writes the tensors of X.pt into the directory X.pt.tensors; plain torch.save writes nothing beside X.pt.
    kinds = {
        path: ("xser" if Path(f"{path}{XSER_TENSORS_SUFFIX}").is_dir() else "plain") for path in rank_files.values()
    }
    if len(set(kinds.values())) > 1:
        xser = sorted(str(p) for p, k in kinds.items() if k == "xser")[0]
        plain = sorted(str(p) for p, k in kinds.items() if k == "plain")[0]
        raise CheckpointError(
            f"{plain}: expected every rank file to use the same serialization, found plain here and xser at {xser}"
        )
    return next(iter(kinds.values()))  # type: ignore[return-value]


def _check_metadata_tp(metadata: dict, tp_size: int, path: Path) -> None:
    for name, entry in metadata.get("parameters", {}).items():
        if entry.get("tensor_model_parallel") and entry.get("num_partitions", tp_size) != tp_size:
            raise CheckpointError(
                f"{path}: parameter '{name}' says num_partitions={entry.get('num_partitions')}, but the checkpoint "
                f"has {tp_size} tp rank files"
            )


# ---------------------------------------------------------------------------------------------------------------------
# Metadata


def load_metadata(path: str | os.PathLike) -> dict:
    """Read ``mp_metadata_pp_rank_<P>.json`` (or an old ``.pt`` pickle, through the restricted unpickler that admits
    only plain dict/list/str/int/float/bool/None). Returned as on disk: see :func:`normalize_parameters_metadata`."""
    path = Path(path)
    if path.suffix == ".json":
        metadata = read_json(path, error=CheckpointError)
    else:
        metadata = load_plain_pickle(path)
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: expected a metadata dict, found {type(metadata).__name__}")
    parameters = metadata.get("parameters", {})
    if not isinstance(parameters, dict) or not all(isinstance(v, dict) for v in parameters.values()):
        raise CheckpointError(f"{path}: expected 'parameters' to map names to attribute dicts")
    if not isinstance(metadata.get("model_weight_transformation_specs", []), list):
        raise CheckpointError(f"{path}: expected 'model_weight_transformation_specs' to be a list")
    return validate(metadata, METADATA_SCHEMA, file=path, error=CheckpointError)


def strip_peft_wrapper_prefix(metadata: dict, path: Path) -> tuple[dict, str]:
    """``(metadata named like the model, the prefix removed)`` for one stage of an adapter.

    optimum-neuron's ``NeuronPeftModel`` names every parameter and every spec module from the PEFT wrapper
    (``base_model.model.model.layers.0.self_attn``). Names without the prefix are taken as they are (the prefix
    returned is then ""); a mix is an error, since the rank files cannot agree with both.
    """
    parameters = metadata.get("parameters", {})
    groups = metadata.get("model_weight_transformation_specs", [])
    modules = [g.get("module_fully_qualified_name") if isinstance(g, dict) else None for g in groups]
    names = [*parameters, *modules]
    prefixed = [isinstance(n, str) and n.startswith(PEFT_WRAPPER_PREFIX) for n in names]
    if not any(prefixed):
        return metadata, ""
    if not all(prefixed):
        odd = next(n for n, p in zip(names, prefixed) if not p)
        raise CheckpointError(
            f"{path}: expected every parameter and spec module of an adapter to be named from the PEFT wrapper "
            f"('{PEFT_WRAPPER_PREFIX}...') like the others, found {odd!r}"
        )
    cut = len(PEFT_WRAPPER_PREFIX)
    stripped = dict(metadata)
    stripped["parameters"] = {name[cut:]: entry for name, entry in parameters.items()}
    stripped["model_weight_transformation_specs"] = [
        {**group, "module_fully_qualified_name": group["module_fully_qualified_name"][cut:]} for group in groups
    ]
    return stripped, PEFT_WRAPPER_PREFIX


def strip_key_prefix(tensors: dict[str, Any], prefix: str, path: Path) -> dict[str, Any]:
    """Rank-file ``tensors`` with ``prefix`` removed from every key (the metadata said the part carries it)."""
    if not prefix:
        return tensors
    odd = next((key for key in tensors if not key.startswith(prefix)), None)
    if odd is not None:
        raise CheckpointError(
            f"{path}: expected every tensor key to start with '{prefix}' like the metadata's names, found {odd!r}"
        )
    return {key[len(prefix) :]: value for key, value in tensors.items()}


_FUSED_QKV_SUFFIXES = (".weight_qkv", ".bias_qkv")
FUSE_AXIS_NAMES = {0: "column", 1: "row", "column": "column", "row": "row"}


def normalize_fuse_axis(value: Any) -> str:
    """``fuse_axis`` as "column" or "row" (files store 0/1 or the names)."""
    try:
        return FUSE_AXIS_NAMES[value]
    except (KeyError, TypeError):
        raise CheckpointError(f"expected fuse_axis 0, 1, 'column' or 'row', found {value!r}") from None


def normalize_parameters_metadata(metadata: dict, tp_size: int | None = None) -> dict:
    """A deep copy of ``metadata`` where fused ``...weight_qkv``/``...bias_qkv`` entries, recorded on disk as
    ``{"tensor_model_parallel": false}`` although each rank holds its dim-0 shard, say what they really are.

    ``tp_size`` defaults to the ``num_partitions`` of the other sharded parameters (1 when none is sharded).
    """
    cleaned = copy.deepcopy(metadata)
    parameters = cleaned.get("parameters", {})
    if tp_size is None:
        sizes = {
            entry["num_partitions"]
            for entry in parameters.values()
            if entry.get("tensor_model_parallel") and "num_partitions" in entry
        }
        if len(sizes) > 1:
            raise CheckpointError(f"expected one num_partitions across parameters, found {sorted(sizes)}")
        tp_size = sizes.pop() if sizes else 1
    for name, entry in parameters.items():
        if name.endswith(_FUSED_QKV_SUFFIXES) and not entry.get("tensor_model_parallel"):
            parameters[name] = {
                "tensor_model_parallel": True,
                "partition_dim": 0,
                "partition_stride": 1,
                "num_partitions": tp_size,
            }
    return cleaned


_LORA_MODULES = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"}


def adapter_key_from_metadata_name(name: str, adapter_name: str) -> str | None:
    """Key under which an adapter rank file stores the metadata parameter ``name`` (``...lora_B.<adapter>.w`` ->
    ``...lora_B.w``), or None when ``name`` is not a tensor of that adapter (e.g. ``...base_layer.weight``)."""
    parts = name.split(".")
    for index in range(len(parts) - 1):
        if parts[index] in _LORA_MODULES and parts[index + 1] == adapter_name:
            return ".".join(parts[: index + 1] + parts[index + 2 :])
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Rank files


def open_rank_file(path: str | os.PathLike) -> dict[str, LazyTensor]:
    """Open one rank file, plain or xser, as ``{name: LazyTensor}`` without reading tensor data (`scan_rank_file`)."""
    from ..formats.lazy_tensor import LazyTensor

    return {key: LazyTensor.from_stored(stored) for key, stored in scan_rank_file(path).items()}


def scan_rank_file(path: str | os.PathLike) -> dict[str, StoredTensor]:
    """Where each tensor of one rank file, plain or xser, is, without torch and without reading tensor data.

    For xser, every ``X.pt.tensors/tensor_<i>.pt`` is scanned (headers only) so that a missing or corrupted tensor
    file is reported now, by name, rather than in the middle of a consolidation.
    """
    path = Path(path)
    entries = scan_torch_references(path)
    references = {key: value for key, value in entries.items() if isinstance(value, TensorReference)}
    if not references:
        return entries  # type: ignore[return-value]
    if len(references) != len(entries):
        raise CheckpointError(f"{path}: expected only tensors or only xser TensorReferences, found a mix")
    return {key: _scan_reference(path, key, ref) for key, ref in references.items()}


def _scan_reference(path: Path, key: str, ref: TensorReference) -> StoredTensor:
    tid = getattr(ref, "tid", None)
    if type(tid) is not int or tid < 0:  # the tensor file's name is built from it
        raise CheckpointError(f"{path}: xser reference '{key}' has no non-negative integer tid, found {tid!r}")
    tensor_file = xser_tensor_file(path, tid)
    if not tensor_file.is_file():
        raise CheckpointError(f"{tensor_file}: expected the xser tensor file of '{key}' (tid {tid}), it is missing")
    stored = scan_torch_tensor(tensor_file, key)
    shape, dtype = ref.shape, ref.dtype  # dtype by name
    if (shape is not None and tuple(shape) != stored.shape) or (dtype is not None and dtype != stored.dtype):
        raise CheckpointError(
            f"{tensor_file}: reference '{key}' expects shape {shape} dtype {dtype}, found {stored.shape} {stored.dtype}"
        )
    return stored
