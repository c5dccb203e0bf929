"""Verification: re-derive every rank's shards from a consolidated directory and compare them with the input
(`rederive`), then check that every output loads in Transformers / PEFT (`loadability`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import CheckpointError
from .torch_engine import parse_dtype, plan_consolidation
from .loadability import check_adapter_keys, check_model_keys
from .rederive import VerifyResult, open_output, verify_targets


def verify(
    checkpoint_dir: str | os.PathLike,
    consolidated_dir: str | os.PathLike,
    *,
    adapter: str | None = None,
    dtype: str | torch.dtype | None = None,
    check_checksums: bool = True,
) -> VerifyResult:
    """Check that ``consolidated_dir`` (as written by `consolidate` with the same ``adapter``/``dtype``) re-shards
    to exactly the rank files of ``checkpoint_dir``. Raises `CheckpointError` naming the first mismatch."""
    cast = parse_dtype(dtype)
    checkpoint, targets = plan_consolidation(checkpoint_dir, adapter=adapter, dtype=cast, check_checksums=check_checksums)
    result = verify_targets(targets, consolidated_dir, dtype=cast)
    check_loadable(targets, Path(consolidated_dir), checkpoint.config_file)
    return result


def check_loadable(targets, output_root: Path, config_file: Path | None) -> None:
    """Every output holds exactly the keys Transformers / PEFT load (`loadability`); no extra tensor either."""
    for target in targets:
        directory = output_root / target.subdir
        keys = set(open_output(directory, target.kind))
        planned = {plan.name for plan in target.plans}
        extra = sorted(keys - planned)
        if extra:
            raise CheckpointError(f"{directory}: holds tensors the checkpoint does not, e.g. {extra[:3]}")
        if target.kind == "adapter":
            check_adapter_keys(keys, directory, config_file)
        elif config_file is not None:
            check_model_keys(keys, config_file, directory)
