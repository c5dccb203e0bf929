"""Tensor-parallel process groups and the explicit `TensorParallel` layout object.

Ranks are laid out Megatron-style: tensor parallel varies fastest, then data parallel, then pipeline parallel, so
the tensor-parallel group of rank ``r`` is the contiguous block ``[r - r % tp, r - r % tp + tp)``.

The getters answer, in order of precedence:

1. neuronx-distributed's parallel state, when that package has ALREADY been imported by the training script and
   its state is initialized (on Trainium the trainer owns the groups, so we must use the same ones). We never
   import it ourselves: importing it pulls in torch_xla, which is absent off Trainium.
2. our own state, set by `initialize_model_parallel`.
3. a single-device default: size 1, rank 0, no group. Nothing here needs a process group at tp = 1.

Layers capture a `TensorParallel` at construction (``TensorParallel.from_state()`` unless one is passed), so their
forward never reads these globals.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from ..errors import ConfigError

ProcessGroup = Any  # torch.distributed.ProcessGroup; kept loose so the XLA / neuronx-distributed groups also fit


@dataclass(frozen=True)
class TensorParallel:
    """Who this process is within its tensor-parallel group.

    ``group`` is None only at size 1 (no collective is ever issued then) or to mean the default (world) group.
    """

    size: int = 1
    rank: int = 0
    group: ProcessGroup | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ConfigError(f"TensorParallel.size must be an int >= 1, got {self.size!r}")
        if not isinstance(self.rank, int) or not 0 <= self.rank < self.size:
            raise ConfigError(f"TensorParallel.rank must be in [0, {self.size}), got {self.rank!r}")

    def __deepcopy__(self, memo: dict) -> TensorParallel:
        return self  # immutable, and a process group must be shared, not copied (deepcopy of a layer)

    @property
    def is_parallel(self) -> bool:
        """True when collectives must be issued (size > 1)."""
        return self.size > 1

    @classmethod
    def single(cls) -> TensorParallel:
        """The single-device layout: size 1, rank 0, no group."""
        return cls(1, 0, None)

    @classmethod
    def from_state(cls) -> TensorParallel:
        """The layout of the current process, read once from the initialized parallel state (see module doc)."""
        size, rank = get_tensor_model_parallel_size(), get_tensor_model_parallel_rank()
        return cls(size, rank, get_tensor_model_parallel_group())


def resolve_tp(tp: TensorParallel | None) -> TensorParallel:
    """``tp`` itself, or the layout from the parallel state when None. Call at construction, not in forward."""
    if tp is None:
        return TensorParallel.from_state()
    if not isinstance(tp, TensorParallel):
        raise ConfigError(f"tp must be a TensorParallel or None, got {type(tp).__name__}")
    return tp


@dataclass
class _State:
    tp_size: int
    pp_size: int
    tp_rank: int
    pp_rank: int
    dp_size: int
    dp_rank: int
    tp_group: ProcessGroup | None
    pp_group: ProcessGroup | None
    dp_group: ProcessGroup | None


_STATE: _State | None = None


def _nxd_state() -> Any | None:
    """neuronx-distributed's ``parallel_state`` module when it is loaded and initialized, else None."""
    if "neuronx_distributed" not in sys.modules:
        return None  # never trigger the import (it needs torch_xla); the trainer imports it when in use
    try:
        from neuronx_distributed.parallel_layers import parallel_state  # type: ignore[import-not-found]
    except Exception:  # a broken install must not break CPU/GPU use
        return None
    try:
        return parallel_state if parallel_state.model_parallel_is_initialized() else None
    except Exception:
        return None


def _check_sizes(tensor_model_parallel_size: int, pipeline_model_parallel_size: int) -> None:
    for name, value in (
        ("tensor_model_parallel_size", tensor_model_parallel_size),
        ("pipeline_model_parallel_size", pipeline_model_parallel_size),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be an int >= 1, got {value!r}")


def group_ranks(
    world_size: int, tensor_model_parallel_size: int, pipeline_model_parallel_size: int = 1
) -> dict[str, list[list[int]]]:
    """Rank lists of every tensor / data / pipeline parallel group (pure; validates the sizes)."""
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    _check_sizes(tp, pp)
    if world_size % (tp * pp) != 0:
        raise ConfigError(
            f"tensor_model_parallel_size={tp} x pipeline_model_parallel_size={pp} = {tp * pp} must divide the "
            f"world size {world_size}; choose sizes whose product divides {world_size}"
        )
    dp = world_size // (tp * pp)
    stage = world_size // pp  # ranks per pipeline stage
    tp_groups = [list(range(start, start + tp)) for start in range(0, world_size, tp)]
    dp_groups = [[s * stage + d * tp + t for d in range(dp)] for s in range(pp) for t in range(tp)]
    pp_groups = [list(range(i, world_size, stage)) for i in range(stage)]
    return {"tp": tp_groups, "dp": dp_groups, "pp": pp_groups}


def initialize_model_parallel(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1) -> None:
    """Create the tensor / data / pipeline parallel groups on top of the initialized default process group.

    At tp = pp = 1 without a process group this only records a single-device state. Every rank must call it
    (``new_group`` is collective). Raises `ConfigError` when the sizes do not divide the world size.
    """
    global _STATE
    if _STATE is not None:
        raise ConfigError(
            "initialize_model_parallel: the model parallel state is already initialized; "
            "call destroy_model_parallel() first"
        )
    nxd = _nxd_state()
    if nxd is not None:
        found = (nxd.get_tensor_model_parallel_size(), nxd.get_pipeline_model_parallel_size())
        if found != (tensor_model_parallel_size, pipeline_model_parallel_size):
            raise ConfigError(
                f"initialize_model_parallel: neuronx-distributed is already initialized with (tp, pp) = {found}, "
                f"asked for ({tensor_model_parallel_size}, {pipeline_model_parallel_size})"
            )
        return  # its state already answers the getters
    if not dist.is_available() or not dist.is_initialized():
        if (tensor_model_parallel_size, pipeline_model_parallel_size) != (1, 1):
            _check_sizes(tensor_model_parallel_size, pipeline_model_parallel_size)
            raise ConfigError(
                f"initialize_model_parallel: tensor_model_parallel_size={tensor_model_parallel_size}, "
                f"pipeline_model_parallel_size={pipeline_model_parallel_size} need an initialized torch.distributed "
                "process group; call torch.distributed.init_process_group (or launch.init_distributed_from_env) first"
            )
        _STATE = _State(1, 1, 0, 0, 1, 0, None, None, None)
        return
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = group_ranks(world, tensor_model_parallel_size, pipeline_model_parallel_size)
    found: dict[str, tuple[int, int, ProcessGroup]] = {}
    for kind in ("tp", "dp", "pp"):
        for ranks in groups[kind]:
            group = dist.new_group(ranks)  # collective: every rank creates every group, in the same order
            if rank in ranks:
                found[kind] = (len(ranks), ranks.index(rank), group)
    _STATE = _State(
        tp_size=found["tp"][0], pp_size=found["pp"][0], dp_size=found["dp"][0],
        tp_rank=found["tp"][1], pp_rank=found["pp"][1], dp_rank=found["dp"][1],
        tp_group=found["tp"][2], pp_group=found["pp"][2], dp_group=found["dp"][2],
    )  # fmt: skip


def destroy_model_parallel() -> None:
    """Forget our groups (the default process group is left alone). Safe to call when not initialized."""
    global _STATE
    state, _STATE = _STATE, None
    if state is None or not (dist.is_available() and dist.is_initialized()):
        return
    for group in {id(g): g for g in (state.tp_group, state.dp_group, state.pp_group) if g is not None}.values():
        try:
            dist.destroy_process_group(group)
        except Exception:  # some backends cannot destroy subgroups; forgetting them is enough
            pass


def model_parallel_is_initialized() -> bool:
    """True once `initialize_model_parallel` ran (or neuronx-distributed's state is initialized)."""
    return _STATE is not None or _nxd_state() is not None


def get_tensor_model_parallel_size() -> int:
    nxd = _nxd_state()
    if nxd is not None:
        return int(nxd.get_tensor_model_parallel_size())
    return _STATE.tp_size if _STATE is not None else 1


def get_tensor_model_parallel_rank() -> int:
    nxd = _nxd_state()
    if nxd is not None:
        return int(nxd.get_tensor_model_parallel_rank())
    return _STATE.tp_rank if _STATE is not None else 0


def get_tensor_model_parallel_group() -> ProcessGroup | None:
    """The tensor-parallel group, or None in the single-device default."""
    nxd = _nxd_state()
    if nxd is not None:
        return nxd.get_tensor_model_parallel_group()
    return _STATE.tp_group if _STATE is not None else None


def get_data_parallel_size() -> int:
    nxd = _nxd_state()
    if nxd is not None:
        return int(nxd.get_data_parallel_size())
    return _STATE.dp_size if _STATE is not None else 1


def get_data_parallel_rank() -> int:
    nxd = _nxd_state()
    if nxd is not None:
        return int(nxd.get_data_parallel_rank())
    return _STATE.dp_rank if _STATE is not None else 0


def get_data_parallel_group() -> ProcessGroup | None:
    nxd = _nxd_state()
    if nxd is not None:
        return nxd.get_data_parallel_group()
    return _STATE.dp_group if _STATE is not None else None


def get_pipeline_model_parallel_size() -> int:
    nxd = _nxd_state()
    if nxd is not None:
        return int(nxd.get_pipeline_model_parallel_size())
    return _STATE.pp_size if _STATE is not None else 1


def get_pipeline_model_parallel_rank() -> int:
    nxd = _nxd_state()
    if nxd is not None:
        return int(nxd.get_pipeline_model_parallel_rank())
    return _STATE.pp_rank if _STATE is not None else 0
