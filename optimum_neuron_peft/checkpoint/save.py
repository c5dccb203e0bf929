"""Save a checkpoint in our sharded format, from one process or from every rank of a torch.distributed group.

Both savers are atomic: files go to a hidden temporary directory beside ``output_dir`` that is renamed over it at
the end, so a crash at any moment leaves the previous checkpoint intact (see `utils.atomic`).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..errors import CheckpointError, OptimumNeuronPeftError
from ..transformations.names import ADAPTER_CONFIG_NAME
from ..utils.atomic import atomic_output_dir
from .native_format import (
    common_dtype,
    copy_root_files,
    metadata_path,
    rank_file_path,
    write_json,
    write_manifest,
    write_part,
    write_rank_file,
)

RankStateDicts = Mapping[tuple[int, int], Mapping[str, torch.Tensor]] | Iterable[tuple[tuple[int, int], Mapping[str, torch.Tensor]]]
_RANK_RE = re.compile(r"tp_rank_(\d+)_pp_rank_(\d+)\.safetensors$")


@dataclass
class AdapterShards:
    """One adapter to save: its rank state dicts (LoRA keys without adapter name), metadata per stage (training
    names, with the adapter name) and its ``adapter_config.json`` dict in ORIGINAL module names."""

    rank_state_dicts: RankStateDicts
    metadata_per_pp: Mapping[int, Mapping[str, Any]]
    adapter_config: Mapping[str, Any] = field(default_factory=dict)


def _sizes(records: Iterable[str]) -> tuple[int, int]:
    ranks = [tuple(int(x) for x in m.groups()) for r in records if (m := _RANK_RE.search(r))]
    if not ranks:
        raise CheckpointError("save_sharded_checkpoint: no rank state dict was given")
    return max(t for t, _ in ranks) + 1, max(p for _, p in ranks) + 1


def save_sharded_checkpoint(
    output_dir: str | os.PathLike,
    rank_state_dicts: RankStateDicts | None,
    metadata_per_pp: Mapping[int, Mapping[str, Any]] | None,
    config: Mapping[str, Any] | str | os.PathLike | None = None,
    extra_files: Iterable[str | os.PathLike] = (),
    adapters: Mapping[str, AdapterShards] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write a checkpoint from one process: ``rank_state_dicts`` maps (or yields) ``(tp, pp) -> {name: tensor}``
    (None to save adapters only). Returns ``output_dir``."""
    adapters = dict(adapters or {})
    if rank_state_dicts is None and not adapters:
        raise CheckpointError(f"{output_dir}: nothing to save (no model state dicts and no adapters)")
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        records = copy_root_files(tmp, config, extra_files)
        dtypes: set[torch.dtype] = set()
        sizes = set()
        if rank_state_dicts is not None:
            part = write_part(tmp, rank_state_dicts, metadata_per_pp or {}, dtypes=dtypes)
            sizes.add(_sizes(part))
            records.update(part)
        for name, adapter in adapters.items():
            part = write_part(
                tmp, adapter.rank_state_dicts, adapter.metadata_per_pp, adapter_name=name,
                adapter_config=adapter.adapter_config, dtypes=dtypes,
            )
            sizes.add(_sizes(part))
            records.update(part)
        if len(sizes) != 1:
            raise CheckpointError(f"{output_dir}: the model and adapters were given for different tp/pp sizes {sorted(sizes)}")
        ((tp_size, pp_size),) = sizes
        write_manifest(
            tmp, records, tp_size=tp_size, pp_size=pp_size, dtype=common_dtype(dtypes),
            has_model=rank_state_dicts is not None, adapters=adapters,
        )
    return Path(output_dir)


def save_sharded_checkpoint_distributed(
    output_dir: str | os.PathLike,
    local_state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any],
    *,
    tp_rank: int,
    tp_size: int,
    pp_rank: int = 0,
    pp_size: int = 1,
    group: Any = None,
    config: Mapping[str, Any] | str | os.PathLike | None = None,
    adapter_name: str | None = None,
    adapter_config: Mapping[str, Any] | None = None,
    extra_files: Iterable[str | os.PathLike] = (),
    overwrite: bool = True,
) -> Path:
    """Collective save: every rank of ``group`` (one per (tp, pp) pair; data-parallel replicas other than 0 must
    not call it) writes its own rank file; group rank 0 writes metadata, config and manifest and renames.

    ``metadata`` is this rank's pipeline stage metadata (only tp rank 0's copy is written). ``output_dir`` must be
    on a file system every rank sees. Every rank raises `CheckpointError` if any rank failed; then the previous
    checkpoint at ``output_dir`` is left intact and the temporary directory removed.
    """
    import torch.distributed as dist

    rank = dist.get_rank(group)
    world = dist.get_world_size(group)
    src = dist.get_global_rank(group, 0) if group is not None else 0
    if world != tp_size * pp_size:
        raise CheckpointError(f"save_sharded_checkpoint_distributed: the group has {world} ranks, expected tp_size*pp_size={tp_size * pp_size}")
    context = None
    status: list[Any] = [None]
    if rank == 0:
        try:
            context = atomic_output_dir(output_dir, overwrite=overwrite)
            status = [("ok", str(context.__enter__()))]
        except OptimumNeuronPeftError as err:
            status = [("error", str(err))]
    dist.broadcast_object_list(status, src=src, group=group)
    if status[0][0] == "error":
        raise CheckpointError(status[0][1])
    tmp = Path(status[0][1])

    try:
        record = write_rank_file(rank_file_path(tmp, tp_rank, pp_rank, adapter_name), local_state_dict)
        dtypes = {t.dtype for t in local_state_dict.values() if t.is_floating_point()}
        mine = ("ok", tp_rank, pp_rank, record, dict(metadata) if tp_rank == 0 else None, dtypes)
    except Exception as err:  # reported to rank 0, which cancels the save for everyone
        mine = ("error", f"rank {rank} (tp {tp_rank}, pp {pp_rank}): {err}")
    results: list[Any] = [None] * world
    dist.all_gather_object(results, mine, group=group)

    final: list[Any] = [None]
    if rank == 0:
        try:
            errors = [r[1] for r in results if r[0] == "error"]
            if errors:
                raise CheckpointError(f"{output_dir}: save failed on {errors[0]}")
            ranks = sorted((r[1], r[2]) for r in results)
            if ranks != [(t, p) for t in range(tp_size) for p in range(pp_size)]:
                raise CheckpointError(f"{output_dir}: expected each (tp, pp) rank once, got {ranks}")
            records = copy_root_files(tmp, config, extra_files)
            for _, tp, pp, rec, meta, _ in results:
                records[rank_file_path(tmp, tp, pp, adapter_name).relative_to(tmp).as_posix()] = rec
                if meta is not None:
                    path = metadata_path(tmp, pp, adapter_name)
                    records[path.relative_to(tmp).as_posix()] = write_json(path, meta)
            if adapter_name is not None:
                path = rank_file_path(tmp, 0, 0, adapter_name).parents[2] / ADAPTER_CONFIG_NAME
                records[path.relative_to(tmp).as_posix()] = write_json(path, dict(adapter_config or {}))
            write_manifest(
                tmp, records, tp_size=tp_size, pp_size=pp_size,
                dtype=common_dtype(set().union(*(r[5] for r in results))),
                has_model=adapter_name is None, adapters=[adapter_name] if adapter_name else [],
            )
            context.__exit__(None, None, None)  # fsync and rename over output_dir
            final = [("ok", None)]
        except BaseException as err:
            context.__exit__(*sys.exc_info())  # removes the temporary directory
            final = [("error", str(err))]
    dist.broadcast_object_list(final, src=src, group=group)
    if final[0][0] == "error":
        raise CheckpointError(final[0][1])
    return Path(output_dir)
