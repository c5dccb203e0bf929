"""Verification of a consolidated directory against its sharded checkpoint, then that every output loads in
Transformers / PEFT (`loadability`).

A checkpoint the torch-free planner vouches for (model, adapters or one ``adapter``), checked as saved (no
``dtype``, safetensors output), is verified without torch: every output byte against the rank-file bytes it comes
from (`byte_verify`). Anything else re-derives every rank's shards from the output with torch and compares them
(`rederive`), and the result says why.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from .byte_verify import BytesVerified, has_safetensors_output, verify_written
from .consolidate import options_needing_torch
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
    reason = options_needing_torch(ConsolidateOptions(adapter=adapter, dtype=dtype))
    if reason is None:
        from .torch_free_plan import plan_model

        try:
            plan = plan_model(checkpoint_dir, adapter=adapter, check_checksums=check_checksums)
        except Unsupported as err:
            reason = str(err)
        except CheckpointError as err:  # the torch path reports it, with its own message
            reason = f"the torch-free planner refused it ({err})"
        else:
            reason = _output_needing_torch(plan, consolidated_dir)
            if reason is None:
                return _verify_bytes(plan, consolidated_dir)
    return _verify_with_torch(checkpoint_dir, consolidated_dir, adapter, dtype, check_checksums, reason)


def _output_needing_torch(plan, consolidated_dir: Path) -> str | None:
    """Why the output needs the torch re-derivation (it is not in safetensors, e.g. ``format="pytorch"``), or None."""
    for part in plan.parts:
        if not has_safetensors_output(part, consolidated_dir / part.subdir):
            return f"the output holds no safetensors {'model' if part.adapter_name is None else 'adapter'} weights"
    return None


def _verify_bytes(plan, consolidated_dir: Path) -> BytesVerified:
    from .loadability import ExpectedModelKeys, check_adapter_keys_against, mismatch_error

    config_file = plan.checkpoint.config_file
    expected = {}
    try:
        if config_file is not None:  # derived or computed while the bytes are compared (`loadability`)
            expected = {part.adapter_name: ExpectedModelKeys(config_file, part.adapter_config) for part in plan.parts}
        result = verify_written(plan, consolidated_dir)  # each part's key set is its plan's
        for part in plan.parts:
            names, directory = [t.name for t in part.tensors], consolidated_dir / part.subdir
            if part.adapter_name is None:
                if expected:
                    mismatch_error(names, *expected[None].result(), directory)
            else:
                keys = expected[part.adapter_name].result()[0] if expected else None
                check_adapter_keys_against(names, directory, keys)
    finally:
        for keys in expected.values():
            keys.cancel()
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
