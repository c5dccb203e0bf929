"""The one dispatch between the two consolidation engines; imports no torch.

The torch-free engine (`torch_free`) writes a full model by byte copies planned from the files' headers and the
declared layouts (`torch_free_plan`); the torch engine (`torch_engine.consolidate_with_torch`) does everything,
tensor math included. Both write the same bytes where both apply.

The choice is explicit and always has a stated reason, never a silent switch:

- options that need tensor math (a dtype cast, ``pytorch`` output) choose the torch engine, with that option
  as the reason (``verify`` does not: each engine verifies its own output, the torch-free one by comparing
  the bytes of the model and of every adapter, `byte_verify`);
- else the torch-free planner plans the checkpoint; a layout it does not vouch for raises `declared.Unsupported`
  (what it is) and a file it refuses raises `CheckpointError`: the torch engine takes the checkpoint with that
  reason recorded (and reports the checkpoint's errors with its established messages);
- ``engine="torch-free"`` turns any such reason into one `CheckpointError` line instead; ``engine="torch"`` always
  takes the torch engine.

Only those two exceptions are reasons: anything else raised while planning is a bug and propagates.
`ConsolidationResult.reason` and its summary (``[torch-free engine]`` / ``[torch engine: <reason>]``) report it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import CheckpointError
from .engine_common import ConsolidateOptions, ConsolidationResult, check_arguments
from .declared import Unsupported

ENGINES = ("auto", "torch", "torch-free")
Engine = Literal["auto", "torch", "torch-free"]


@dataclass(frozen=True)
class Choice:
    """The engine that takes a consolidation; ``plan``: the torch-free plan (`torch_free_plan.ModelPlan`) when it is
    that engine, ``reason``: why the torch engine when it is that one."""

    engine: Literal["torch", "torch-free"]
    reason: str | None = None
    plan: Any = None


def options_needing_torch(options: ConsolidateOptions) -> str | None:
    """Why these options need the torch engine, or None."""
    if options.format != "safetensors":
        return f"output format {options.format!r}"
    if options.dtype is not None:
        return f"a dtype cast ({_dtype_name(options.dtype)})"
    return None


def _dtype_name(dtype: Any) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def choose_engine(checkpoint_dir: str | os.PathLike, options: ConsolidateOptions, engine: Engine = "auto") -> Choice:
    """The engine for this consolidation (module docstring). Raises `CheckpointError` when ``engine="torch-free"``
    and that engine cannot take it."""
    if engine not in ENGINES:
        raise CheckpointError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "torch":
        return Choice("torch", "asked for (engine='torch')")
    reason = options_needing_torch(options)
    if reason is None:
        from .torch_free_plan import plan_model

        try:
            plan = plan_model(checkpoint_dir, adapter=options.adapter, check_checksums=options.check_checksums)
            return Choice("torch-free", plan=plan)
        except Unsupported as err:
            reason = str(err)
        except CheckpointError as err:  # the torch engine reports it, with its own message
            reason = f"the torch-free planner refused it ({err})"
    if engine == "torch-free":
        raise CheckpointError(f"{checkpoint_dir}: the torch-free engine cannot consolidate this checkpoint: {reason}")
    return Choice("torch", reason)


def consolidate_with(
    checkpoint_dir: str | os.PathLike, output_dir: str | os.PathLike, options: ConsolidateOptions, engine: Engine = "auto"
) -> ConsolidationResult:
    """Consolidate with the engine `choose_engine` picks: the library's `consolidate` and the CLI both call this."""
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    check_arguments(checkpoint_dir, output_dir, format=options.format, max_shard_size=options.max_shard_size, overwrite=options.overwrite)
    start = time.perf_counter()
    choice = choose_engine(checkpoint_dir, options, engine)
    if choice.engine == "torch-free":
        from .torch_free import consolidate_plan

        result = consolidate_plan(choice.plan, checkpoint_dir, output_dir, options)
    else:
        from .torch_engine import consolidate_with_torch  # imports torch

        result = consolidate_with_torch(checkpoint_dir, output_dir, options)
        result.reason = choice.reason
    result.seconds = time.perf_counter() - start  # planning included, as the engines' own figures are not
    return result


def consolidate(
    checkpoint_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    format: str = "safetensors",
    max_shard_size: int | str = "5GB",
    adapter: str | None = None,
    dtype: Any = None,
    overwrite: bool = False,
    verify: bool = False,
    check_checksums: bool = False,
    progress: bool = False,
    engine: Engine = "auto",
) -> ConsolidationResult:
    """Consolidate ``checkpoint_dir`` (our sharded format or optimum-neuron's) into ``output_dir``.

    Writes a Transformers model directory (config/tokenizer files copied, ``model.safetensors`` or shards with
    an index past ``max_shard_size``) and/or vanilla PEFT adapter directories (layout in `consolidate`'s module
    docstring). ``dtype`` (a name, ``bf16``/``fp16``/``fp32``, or a torch dtype) casts floating tensors. ``verify``
    checks the output bit for bit against the input before it is published: the torch-free engine compares every
    output byte with the rank-file bytes it comes from (`byte_verify`), the torch engine re-derives every rank's
    shards from the output (with ``dtype``, against the input cast to it). The output is written atomically; a non-empty ``output_dir``
    is refused unless ``overwrite``. Raises `CheckpointError`.

    ``engine``: ``"auto"`` picks as the module docstring says (same output bytes either way), ``"torch-free"``
    raises where that engine does not apply, ``"torch"`` always takes the torch engine. The result's ``engine``
    and ``reason`` say which one ran and why.
    """
    options = ConsolidateOptions(
        format=format, max_shard_size=max_shard_size, adapter=adapter, dtype=dtype, overwrite=overwrite, verify=verify,
        check_checksums=check_checksums, progress=progress,
    )  # fmt: skip
    return consolidate_with(checkpoint_dir, output_dir, options, engine)
