"""Our sharded checkpoint format: optimum-neuron's layout with safetensors rank files and a manifest.

    <ckpt>/manifest.json                 format, version, kind, tp/pp sizes, dtype, {relpath: {size, sha256}}, adapters
    <ckpt>/config.json, tokenizer and generation files (copied as they are)
    <ckpt>/shards/mp_metadata_pp_rank_<P>.json                 docs/checkpoint_formats.md section 3 schema, training-model names
    <ckpt>/shards/model/tp_rank_<TT>_pp_rank_<PP>.safetensors  the (tp, pp) rank's tensors
    <ckpt>/adapter_<name>/adapter_config.json                 original module names
    <ckpt>/adapter_<name>/adapter_shards/...                  same inner layout; keys without the adapter name

Reading always checks that every file listed in the manifest exists with its recorded size and that no rank file
is missing from the manifest; sha256 checksums (computed while writing) are checked only when asked
(``check_checksums=True``, the CLI's ``--check-checksums`` / ``verify``), since hashing runs at about 1 GB/s.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from ..errors import CheckpointError
from ..transformations.names import ADAPTER_CONFIG_NAME
from .optimum_neuron import (
    ADAPTER_PREFIX,
    ADAPTER_SHARDS_DIR,
    MODEL_SHARDS_DIR,
    RANK_FILES_DIR,
    ShardedPart,
    ROOT_FILES,
    load_metadata,
    metadata_file_name,
)
from ..utils.safe_paths import check_safe_name, check_safe_relative_path
from ..utils.schema import read_json, validate
from .schemas import MANIFEST_SCHEMA
from .stream_writer import FileRecord, SafetensorsStreamWriter, TensorPlan, sha256_file

if TYPE_CHECKING:  # torch-free at import: the torch-free consolidation path opens checkpoints through this module
    import torch

FORMAT_NAME = "optimum-neuron-peft-sharded"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_RANK_FILE_RE = re.compile(r"tp_rank_(\d{2})_pp_rank_(\d{2})\.safetensors")
_METADATA_RE = re.compile(r"mp_metadata_pp_rank_(\d+)\.json")


def rank_file_name(tp_rank: int, pp_rank: int) -> str:
    return f"tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:02d}.safetensors"


def part_directory(root: str | os.PathLike, adapter_name: str | None = None) -> Path:
    root = Path(root)
    return root / MODEL_SHARDS_DIR if adapter_name is None else root / f"{ADAPTER_PREFIX}{adapter_name}" / ADAPTER_SHARDS_DIR


def rank_file_path(root: str | os.PathLike, tp_rank: int, pp_rank: int, adapter_name: str | None = None) -> Path:
    return part_directory(root, adapter_name) / RANK_FILES_DIR / rank_file_name(tp_rank, pp_rank)


def metadata_path(root: str | os.PathLike, pp_rank: int, adapter_name: str | None = None) -> Path:
    return part_directory(root, adapter_name) / metadata_file_name(pp_rank)


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def write_rank_file(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor]) -> FileRecord:
    """One rank's tensors as a safetensors file (sha256 computed while writing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with SafetensorsStreamWriter(path, [TensorPlan.of(n, t) for n, t in state_dict.items()], {"format": "pt"}, hash=True) as writer:
        for name, tensor in state_dict.items():
            writer.write(name, tensor)
    return writer.close()


def write_json(path: str | os.PathLike, data: Any) -> FileRecord:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return file_record(path)


def file_record(path: str | os.PathLike) -> FileRecord:
    return FileRecord(Path(path).stat().st_size, sha256_file(path))


def write_part(
    root: str | os.PathLike,
    rank_state_dicts: Mapping[tuple[int, int], Mapping[str, torch.Tensor]]
    | Iterable[tuple[tuple[int, int], Mapping[str, torch.Tensor]]],
    metadata_per_pp: Mapping[int, Mapping[str, Any]],
    *,
    adapter_name: str | None = None,
    adapter_config: Mapping[str, Any] | None = None,
    dtypes: set[torch.dtype] | None = None,
) -> dict[str, FileRecord]:
    """Write the model's (``adapter_name=None``) or one adapter's metadata and rank files; return their records
    keyed by path relative to ``root``. Rank state dicts are written one at a time (a generator is fine).
    ``dtypes`` collects the floating dtypes written (for the manifest)."""
    root = Path(root)
    records: dict[str, FileRecord] = {}

    def add(path: Path, record: FileRecord) -> None:
        records[path.relative_to(root).as_posix()] = record

    if adapter_name is not None:
        if adapter_config is None:
            raise CheckpointError(f"adapter {adapter_name!r}: an adapter_config is required to save its shards")
        path = part_directory(root, adapter_name).parent / ADAPTER_CONFIG_NAME
        add(path, write_json(path, dict(adapter_config)))
    for pp, metadata in metadata_per_pp.items():
        path = metadata_path(root, pp, adapter_name)
        add(path, write_json(path, metadata))
    items = rank_state_dicts.items() if isinstance(rank_state_dicts, Mapping) else rank_state_dicts
    for (tp, pp), state_dict in items:
        path = rank_file_path(root, tp, pp, adapter_name)
        add(path, write_rank_file(path, state_dict))
        if dtypes is not None:
            dtypes.update(t.dtype for t in state_dict.values() if t.is_floating_point())
    return records


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def write_manifest(
    root: str | os.PathLike,
    files: Mapping[str, FileRecord],
    *,
    tp_size: int,
    pp_size: int,
    dtype: str | None,
    has_model: bool,
    adapters: Iterable[str] = (),
) -> dict[str, Any]:
    adapters = sorted(adapters)
    kind = "model+adapters" if has_model and adapters else ("model" if has_model else "adapters")
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "tp_size": tp_size,
        "pp_size": pp_size,
        "dtype": dtype,
        "adapters": adapters,
        "files": {path: {"size": r.size, "sha256": r.sha256} for path, r in sorted(files.items())},
    }
    write_json(Path(root) / MANIFEST, manifest)
    return manifest


def copy_root_files(root: Path, config: Mapping[str, Any] | str | os.PathLike | None, extra_files: Iterable[str | os.PathLike]) -> dict[str, FileRecord]:
    """config.json (a dict or a file) and extra files (tokenizer...) copied to ``root``."""
    import shutil

    records = {}
    if config is not None:
        target = root / "config.json"
        if isinstance(config, Mapping):
            write_json(target, dict(config))
        else:
            shutil.copyfile(config, target)
        records["config.json"] = file_record(target)
    for extra in extra_files:
        extra = Path(extra)
        shutil.copyfile(extra, root / extra.name)
        records[extra.name] = file_record(root / extra.name)
    return records


def common_dtype(dtypes: Iterable[torch.dtype]) -> str | None:
    """The one floating dtype of a checkpoint, "mixed" when several, None when none."""
    dtypes = set(dtypes)
    return dtype_name(dtypes.pop()) if len(dtypes) == 1 else ("mixed" if dtypes else None)


# ---------------------------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class ShardedCheckpoint:
    """A checkpoint in our format, with the same attributes as `OptimumNeuronCheckpoint` so both read alike."""

    root: Path
    model: ShardedPart | None
    adapters: dict[str, ShardedPart]
    config_file: Path | None
    extra_files: tuple[Path, ...]
    manifest: dict[str, Any] = field(repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike, *, check_checksums: bool = False) -> "ShardedCheckpoint":
        return open_sharded_checkpoint(path, check_checksums=check_checksums)


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    manifest = read_json(path, error=CheckpointError)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: expected format {FORMAT_NAME!r}, found {manifest.get('format') if isinstance(manifest, dict) else manifest!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {manifest.get('format_version')!r} is not supported (this version reads {FORMAT_VERSION})"
        )
    validate(manifest, MANIFEST_SCHEMA, file=path, error=CheckpointError)
    for rel in manifest["files"]:
        check_safe_relative_path(rel, what="file", where=path)
    for name in manifest.get("adapters", []):
        check_safe_name(name, what="adapter name", where=path)
    return manifest


def check_files(root: Path, manifest: Mapping[str, Any], check_checksums: bool) -> None:
    for rel, entry in manifest["files"].items():
        path = root / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in {root / MANIFEST} but missing")
        size = path.stat().st_size
        if size != entry.get("size"):
            raise CheckpointError(
                f"{path}: expected {entry.get('size')} bytes (manifest), found {size} (truncated or modified file)"
            )
        if check_checksums and sha256_file(path) != entry["sha256"]:  # the schema requires every sha256
            raise CheckpointError(f"{path}: sha256 differs from the manifest (corrupted or modified file)")


def open_sharded_checkpoint(path: str | os.PathLike, *, check_checksums: bool = False) -> ShardedCheckpoint:
    root = Path(path)
    manifest = read_manifest(root)
    check_files(root, manifest, check_checksums)
    tp_size, pp_size = int(manifest["tp_size"]), int(manifest["pp_size"])
    listed = set(manifest["files"])
    model = None
    if (root / MODEL_SHARDS_DIR).is_dir():
        model = _open_part(root, None, tp_size, pp_size, listed)
    adapters = {}
    for name in manifest.get("adapters", []):
        adapters[name] = _open_part(root, name, tp_size, pp_size, listed)
    if model is None and not adapters:
        raise CheckpointError(f"{root / MANIFEST}: lists neither model shards nor adapters")
    config = root / "config.json"
    extra = tuple(root / name for name in ROOT_FILES if (root / name).is_file())
    return ShardedCheckpoint(root, model, adapters, config if config.is_file() else None, extra, manifest)


def _open_part(root: Path, adapter_name: str | None, tp_size: int, pp_size: int, listed: set[str]) -> ShardedPart:
    directory = part_directory(root, adapter_name)
    rank_dir = directory / RANK_FILES_DIR
    if not rank_dir.is_dir():
        raise CheckpointError(f"{rank_dir}: expected the directory of rank files, it is missing")
    found = {}
    for file in rank_dir.iterdir():
        match = _RANK_FILE_RE.fullmatch(file.name)
        if match:
            if file.relative_to(root).as_posix() not in listed:
                raise CheckpointError(f"{file}: rank file not listed in {root / MANIFEST} (a partial or mixed checkpoint)")
            found[(int(match.group(1)), int(match.group(2)))] = file
    for pp in range(pp_size):
        for tp in range(tp_size):
            if (tp, pp) not in found:
                raise CheckpointError(
                    f"{rank_dir / rank_file_name(tp, pp)}: missing rank file; the manifest says tp_size={tp_size}, pp_size={pp_size}"
                )
    extra = sorted(k for k in found if k[0] >= tp_size or k[1] >= pp_size)
    if extra:
        raise CheckpointError(
            f"{found[extra[0]]}: rank file beyond the manifest's tp_size={tp_size}, pp_size={pp_size}"
        )
    metadata_files = {}
    for pp in range(pp_size):
        meta = metadata_path(root, pp, adapter_name)
        if not meta.is_file():
            raise CheckpointError(f"{meta}: missing metadata of pipeline stage {pp}")
        metadata_files[pp] = meta
    metadata = {pp: load_metadata(p) for pp, p in metadata_files.items()}
    for pp, meta in metadata.items():
        for name, entry in meta.get("parameters", {}).items():
            if entry.get("tensor_model_parallel") and entry.get("num_partitions") != tp_size:
                raise CheckpointError(
                    f"{metadata_files[pp]}: parameter '{name}' says num_partitions={entry.get('num_partitions')}, "
                    f"but the checkpoint has tp_size={tp_size}"
                )
    adapter_config = None
    if adapter_name is not None:
        adapter_config = directory.parent / ADAPTER_CONFIG_NAME
        if not adapter_config.is_file():
            raise CheckpointError(f"{adapter_config}: missing adapter config of adapter {adapter_name!r}")
    return ShardedPart(
        directory=directory,
        adapter_name=adapter_name,
        tp_size=tp_size,
        pp_size=pp_size,
        serialization="safetensors",  # type: ignore[arg-type]
        metadata_files=metadata_files,
        rank_files=dict(sorted(found.items(), key=lambda item: (item[0][1], item[0][0]))),
        metadata=metadata,
        adapter_config=adapter_config,
    )
