"""`TrainingArguments`: transformers' arguments plus the tensor-parallel layout.

Every transformers field means what it means there. The process view differs in one way: accelerate is run
single-process on every rank (see `single_process_accelerate`), because it would make every rank a data-parallel
replica, while here only the ranks of a data-parallel group are replicas (each replica spans ``tensor_parallel_size``
ranks that see the same batch). So ``world_size`` / ``process_index`` are torch.distributed's, and ``dp_size`` /
``dp_rank`` say which replica this rank belongs to.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.distributed as dist
import transformers

from ..errors import ConfigError

# Variables by which accelerate decides that a process is one of several data-parallel replicas.
_DISTRIBUTED_ENV = ("LOCAL_RANK", "WORLD_SIZE", "RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


@contextlib.contextmanager
def single_process_accelerate():
    """Hide the launcher's variables while accelerate sets up its state, so that it runs single-process.

    accelerate has no switch for "a data-parallel group smaller than the world"; the Trainer shards the data and
    reduces the gradients over our data-parallel group itself.
    """
    saved = {name: os.environ.pop(name) for name in _DISTRIBUTED_ENV if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """`transformers.TrainingArguments` plus the tensor-parallel layout; world size = dp x tp, dp is derived.

    The layout fields left at None are taken from the model when the user passes one, else defaulted
    (tp 1; sequence parallelism on when tp > 1; no fused qkv; the smallest valid kv_size_multiplier).
    """

    tensor_parallel_size: int | None = field(
        default=None, metadata={"help": "Tensor-parallel size (ranks per model replica); default 1, or the model's."}
    )
    sequence_parallel: bool | None = field(
        default=None, metadata={"help": "Shard activations along the sequence; default on when tp > 1."}
    )
    kv_size_multiplier: int | None = field(
        default=None, metadata={"help": "Replicas of each key/value head when tp exceeds the kv heads (GQA)."}
    )
    fuse_qkv: bool | None = field(default=None, metadata={"help": "One fused qkv weight instead of q/k/v."})
    zero_1: bool = field(
        default=False,
        metadata={"help": "ZeRO-1: shard the optimizer state over the data-parallel ranks (optimum-neuron's name)."},
    )
    hardware: str | None = field(
        default=None, metadata={"help": "trn1 or trn2: the per-NeuronCore peak used for the logged MFU."}
    )
    peak_flops_per_device: float | None = field(
        default=None, metadata={"help": "Peak FLOP/s of one device for the logged MFU (overrides hardware)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        tp = self.tensor_parallel_size
        if tp is not None and (isinstance(tp, bool) or not isinstance(tp, int) or tp < 1):
            raise ConfigError(f"TrainingArguments.tensor_parallel_size must be an int >= 1, got {tp!r}")
        if self.hardware is not None and self.hardware not in ("trn1", "trn2"):
            raise ConfigError(f"TrainingArguments.hardware must be 'trn1' or 'trn2' (or leave it unset and give "
                              f"peak_flops_per_device), got {self.hardware!r}")  # fmt: skip
        peak = self.peak_flops_per_device
        if peak is not None and not (isinstance(peak, (int, float)) and peak > 0):
            raise ConfigError(f"TrainingArguments.peak_flops_per_device must be a positive number, got {peak!r}")
        m = self.kv_size_multiplier
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ConfigError(f"TrainingArguments.kv_size_multiplier must be an int >= 1, got {m!r}")

    @cached_property
    def _setup_devices(self):
        # transformers warns that a process group exists without DDP: that is the design here
        log = logging.getLogger(transformers.training_args.__name__)
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:  # single-process accelerate picks cuda:0
                torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            with single_process_accelerate():
                return transformers.TrainingArguments._setup_devices.func(self)
        finally:
            log.setLevel(level)

    # -- the process view -------------------------------------------------------------------------------------

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def process_index(self) -> int:
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @property
    def local_process_index(self) -> int:
        return int(os.environ.get("LOCAL_RANK", self.process_index))

    @property
    def tp_size(self) -> int:
        return self.tensor_parallel_size or 1

    @property
    def dp_size(self) -> int:
        from ..parallel import get_data_parallel_size, model_parallel_is_initialized

        if model_parallel_is_initialized():
            return get_data_parallel_size()
        return max(1, self.world_size // self.tp_size)

    @property
    def dp_rank(self) -> int:
        from ..parallel import get_data_parallel_rank

        return get_data_parallel_rank()
