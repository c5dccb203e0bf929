"""Verification of a consolidated directory against its sharded checkpoint, then that every output loads in
Transformers / PEFT (`loadability`).

A full-model checkpoint the torch-free planner vouches for, checked as saved (no ``adapter``, no ``dtype``,
safetensors output), is verified without torch: every output byte against the rank-file bytes it comes from
(`byte_verify`). Anything else re-derives every rank's shards from the output with torch and compares them
(`rederive`), and the result says why.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from .byte_verify import BytesVerified, has_safetensors_model, verify_written
from .consolidate import VERIFY_ADAPTERS, holds_adapters, options_needing_torch
from .declared import Unsupported
from .engine_common import ConsolidateOptions

if TYPE_CHECKING:
    from .rederive import VerifyResult


def verify(
    checkpoint_dir: str | os.PathLike,
    consolidated_dir: str | os.PathLike,
    *,
    adapter: str | None = None,
    dtype: Any = None,
    check_checksums: bool = True,
) -> BytesVerified | VerifyResult:
    """Check that ``consolidated_dir`` (as written by `consolidate` with the same ``adapter``/``dtype``) holds exactly
    the data of ``checkpoint_dir``'s rank files. Raises `CheckpointError` naming the first mismatch."""
    consolidated_dir = Path(consolidated_dir)
    reason = _needs_torch(adapter, dtype, consolidated_dir)
    if reason is None:
        from .torch_free_plan import plan_model

        try:
            plan = plan_model(checkpoint_dir, check_checksums=check_checksums)
        except Unsupported as err:
            reason = str(err)
        except CheckpointError as err:  # the torch path reports it, with its own message
            reason = f"the torch-free planner refused it ({err})"
        else:
            if not holds_adapters(plan):
                return _verify_bytes(plan, consolidated_dir)
            reason = VERIFY_ADAPTERS
    return _verify_with_torch(checkpoint_dir, consolidated_dir, adapter, dtype, check_checksums, reason)


def _needs_torch(adapter: str | None, dtype: Any, consolidated_dir: Path) -> str | None:
    """Why this verification re-derives with torch (the consolidation options' reasons, then the output's), or None."""
    reason = options_needing_torch(ConsolidateOptions(adapter=adapter, dtype=dtype))
    if reason is None and adapter is not None:
        reason = VERIFY_ADAPTERS
    if reason is None and not has_safetensors_model(consolidated_dir):
        reason = "the output holds no safetensors model weights"
    return reason


def _verify_bytes(plan, consolidated_dir: Path) -> BytesVerified:
    from .loadability import ExpectedModelKeys, mismatch_error

    config_file = plan.checkpoint.config_file
    expected = ExpectedModelKeys(config_file) if config_file is not None else None
    try:
        result = verify_written(plan, consolidated_dir)  # the key set is the plan's
        if expected is not None:
            mismatch_error([t.name for t in plan.tensors], *expected.result(), consolidated_dir)
    finally:
        if expected is not None:
            expected.cancel()
    return result


def _verify_with_torch(checkpoint_dir, consolidated_dir: Path, adapter, dtype, check_checksums: bool, reason: str) -> VerifyResult:
    from .rederive import verify_targets
    from .torch_engine import parse_dtype, plan_consolidation

    cast = parse_dtype(dtype)
    checkpoint, targets = plan_consolidation(checkpoint_dir, adapter=adapter, dtype=cast, check_checksums=check_checksums)
    result = verify_targets(targets, consolidated_dir, dtype=cast)
    check_loadable(targets, consolidated_dir, checkpoint.config_file)
    result.reason = reason
    return result


def check_loadable(targets, output_root: Path, config_file: Path | None) -> None:
    """Every output holds exactly the keys Transformers / PEFT load (`loadability`); no extra tensor either."""
    from .loadability import check_adapter_keys, check_model_keys
    from .rederive import open_output

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
