"""Throughput metrics logged with the loss every ``logging_steps``, and the end-of-training summary.

Per logging window: ``tokens_per_second`` (all data-parallel replicas), ``tokens_per_second_per_device`` (divided
by the world size: every rank is one device), ``step_time`` (seconds per optimizer step), ``peak_host_memory_mb``
(largest peak resident memory of any rank), ``flops_per_second`` (achieved model FLOP/s, frozen base counted as
frozen: `flops.model_step_flops`) and ``mfu`` when the peak of a device is known (``TrainingArguments.hardware``
trn1 / trn2, or ``peak_flops_per_device``). On CPU there is no peak: achieved FLOP/s only.

The counters are per rank; they are summed over the data-parallel group when logged (the tensor-parallel ranks of
a replica process the same tokens, so only dp counts), which every rank does at the same step.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist


def peak_host_memory_mb() -> float:
    """This process's peak resident set size, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


@dataclass
class Window:
    tokens: float = 0.0
    flops: float = 0.0
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)


class ThroughputMeter:
    """Counts tokens and FLOPs of this rank's micro-batches; `window` reduces them over dp and starts anew."""

    def __init__(self, flops_of_batch: Callable[[int, int], float] | None, world_size: int, dp_group: Any,
                 peak_per_device: float | None) -> None:  # fmt: skip
        self.flops_of_batch = flops_of_batch
        self.world_size = world_size
        self.dp_group = dp_group
        self.peak_per_device = peak_per_device
        self.current = Window()
        self.total = Window()
        self.summary_logs: list[dict[str, float]] = []

    def micro_batch(self, input_ids: torch.Tensor) -> None:
        batch, seq = input_ids.shape[0], input_ids.shape[-1]
        self.current.tokens += batch * seq
        if self.flops_of_batch is not None:
            self.current.flops += self.flops_of_batch(batch, seq)

    def optimizer_step(self) -> None:
        self.current.steps += 1

    def window(self) -> dict[str, float]:
        """The metrics of the steps since the last call (collective over the world: call on every rank)."""
        w, now = self.current, time.perf_counter()
        self.current = Window(start=now)
        seconds = max(now - w.start, 1e-9)
        counts = torch.tensor([w.tokens, w.flops], dtype=torch.float64)
        memory = torch.tensor([peak_host_memory_mb()], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            if self.dp_group is not None:
                dist.all_reduce(counts, group=self.dp_group)
            dist.all_reduce(memory, op=dist.ReduceOp.MAX)
        tokens, flops = counts.tolist()
        self.total.tokens += tokens
        self.total.flops += flops
        self.total.steps += w.steps
        logs = {
            "tokens_per_second": tokens / seconds,
            "tokens_per_second_per_device": tokens / seconds / self.world_size,
            "step_time": seconds / max(w.steps, 1),
            "peak_host_memory_mb": float(memory.item()),
        }
        if self.flops_of_batch is not None:
            logs["flops_per_second"] = flops / seconds
            if self.peak_per_device is not None:
                logs["mfu"] = flops / seconds / self.world_size / self.peak_per_device
        return logs

    def summary(self) -> dict[str, Any]:
        seconds = max(time.perf_counter() - self.total.start, 1e-9)
        out: dict[str, Any] = {
            "steps": self.total.steps,
            "tokens": self.total.tokens,
            "seconds": seconds,
            "tokens_per_second": self.total.tokens / seconds,
            "tokens_per_second_per_device": self.total.tokens / seconds / self.world_size,
            "step_time": seconds / max(self.total.steps, 1),
            "peak_host_memory_mb": peak_host_memory_mb(),
            "world_size": self.world_size,
        }
        if self.flops_of_batch is not None:
            out["flops"] = self.total.flops
            out["flops_per_second"] = self.total.flops / seconds
            out["mfu"] = (None if self.peak_per_device is None
                          else self.total.flops / seconds / self.world_size / self.peak_per_device)  # fmt: skip
        return out


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    """Atomically: a temporary file renamed over the target."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(path)


__all__ = ["ThroughputMeter", "Window", "peak_host_memory_mb", "write_summary"]
