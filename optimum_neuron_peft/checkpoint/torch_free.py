"""The torch-free consolidation engine: a sharded checkpoint -> Transformers / PEFT directories, by byte copies.

Every weight of a full model (GQA attention, fused MLP, row/column-parallel and replicated parameters) and of a LoRA
adapter (optimum-neuron's shared lora_A and fused lora_B included) is a pure data move of the saved shards, so
consolidating one needs no tensor math: `torch_free_plan` declares where each
output's bytes are, and this module copies them, without importing torch (whose import alone takes ~2 s, as long
as copying a few GB). The output is byte for byte what the torch engine (`torch_engine`) writes: the same shard
split (`hf_output.split_into_files`), the same safetensors headers (`stream_writer.safetensors_layout`), the same
root files; tests check it.

Streaming: row-wise outputs (`RowCopy`) are copied file to file with ``copy_file_range`` on the calling thread;
column-wise ones (`ColumnGather`: row-parallel o_proj / down_proj, whose every row is cut from every rank) are
gathered through reused numpy buffers on a second thread at the same time. Both write at the output offsets the
headers fix, so neither waits for the other (the copies release the GIL: the kernel copy and numpy's gather run on
both cores). Each tensor's write-back to disk starts as soon as it is written, so the final fsync has little left.

Applies when the checkpoint (model, adapters or both, in the torch engine's directory layout) is in plain, xser or
safetensors rank files, the output is safetensors, no dtype cast is asked, and the planner can vouch for every
tensor: `consolidate` decides, and says why when it is not this engine. ``verify`` re-reads the staged
output and compares it with the rank files' bytes, torch-free too (`byte_verify`), before publishing it.
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import threading
import time
from pathlib import Path
from typing import Callable, Literal

from ..errors import CheckpointError
from ..utils.atomic import atomic_output_dir
from ..utils.safe_paths import check_inside
from .loadability import ExpectedModelKeys, check_adapter_keys_against, mismatch_error
from .byte_copy import RangeCopier, Scratch, SourceFiles, gather_column_bytes, row_ranges
from .engine_common import SLEEP_ENV, ConsolidateOptions, ConsolidationResult, copy_root_files
from .hf_output import SAFETENSORS_METADATA, split_into_files, write_index
from ..transformations.names import ADAPTER_CONFIG_NAME
from ..transformations.pieces import RowCopy
from .stream_writer import SafetensorsPlacedWriter, TensorPlan, WritebackThread
from .torch_free_plan import ModelPlan, PartPlan, PlannedTensor


def consolidate_plan(plan: ModelPlan, checkpoint_dir: Path, output_dir: Path, options: ConsolidateOptions) -> ConsolidationResult:
    """Write ``plan`` (of ``checkpoint_dir``, by `torch_free_plan.plan_model`) to ``output_dir``, atomically, and
    check that Transformers / PEFT would load its keys. `consolidate.choose_engine` made the plan and checked the
    options."""
    o = options
    start = time.perf_counter()
    config_file = plan.checkpoint.config_file
    # The keys Transformers / PEFT expect of each part (`loadability`: derived, cached, or a child process at work
    # while the bytes are copied); without config.json an adapter gets the structural check only.
    expected: dict[str | None, ExpectedModelKeys] = {}
    count = total = 0
    directories = {}
    try:
        if config_file is not None:
            for part in plan.parts:
                expected[part.adapter_name] = ExpectedModelKeys(config_file, part.adapter_config)
        with atomic_output_dir(output_dir, overwrite=o.overwrite, inputs=[checkpoint_dir]) as tmp:
            for part in plan.parts:
                directory = check_inside(tmp, tmp / part.subdir if part.subdir else tmp)
                directory.mkdir(parents=True, exist_ok=True)
                shown_as = output_dir / part.subdir
                names = [t.name for t in part.tensors]
                if part.adapter_name is None:
                    n, size = write_part(part, directory, max_shard_size=o.max_shard_size, progress=o.progress)
                    copy_root_files([config_file, *plan.checkpoint.extra_files], directory)
                    if None in expected:
                        mismatch_error(names, *expected[None].result(), shown_as)
                    directories["model"] = shown_as
                else:
                    n, size = write_part(part, directory, kind="adapter", progress=o.progress)
                    (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(part.adapter_config, indent=2) + "\n")
                    keys = expected[part.adapter_name].result()[0] if part.adapter_name in expected else None
                    check_adapter_keys_against(names, directory, keys, shown_as)
                    directories[part.adapter_name] = shown_as
                if o.verify:  # the staged files, before they are published
                    from .byte_verify import verify_part

                    verify_part(plan, part, directory, shown_as=shown_as)
                count, total = count + n, total + size
    finally:
        for keys in expected.values():
            keys.cancel()
    return ConsolidationResult(output_dir, count, total, time.perf_counter() - start, directories, engine="torch-free")


def write_part(
    plan: PartPlan, directory: Path, *, kind: Literal["model", "adapter"] = "model", max_shard_size: int | str = "5GB",
    progress: bool = False,
) -> tuple[int, int]:
    """Write one part's weight files (and index) into ``directory``: a Transformers model, or a PEFT adapter's one
    file; returns (tensors, bytes)."""
    tensors = plan.tensors
    plans = {t.name: TensorPlan(t.name, t.dtype, t.shape) for t in tensors}
    files, index_name, index = split_into_files(plans, kind, "safetensors", max_shard_size)
    total = sum(p.nbytes for p in plans.values())
    writeback = WritebackThread()
    writers: dict[str, SafetensorsPlacedWriter] = {}
    try:
        for file, names in files.items():
            writers[file] = SafetensorsPlacedWriter(directory / file, [plans[n] for n in names], SAFETENSORS_METADATA, writeback)
        writer_of = {name: writers[file] for file, names in files.items() for name in names}
        with _ProgressBar(total, progress) as on_bytes:
            _stream(plan, writer_of, on_bytes)
    except BaseException:
        writeback.join()
        for writer in writers.values():
            writer.abort()
        raise
    writeback.join()  # before the descriptors it uses are closed
    for writer in writers.values():
        writer.close()
    if index is not None:
        write_index(directory, index_name, index)
    return len(tensors), total


class _Stopped(Exception):
    pass


class _ColumnGatherer:
    """A thread gathering column-wise outputs, in submission order, while the caller copies the row-wise ones."""

    def __init__(self, writer_of: dict[str, SafetensorsPlacedWriter], on_bytes: Callable[[int], None]):
        self._writer_of = writer_of
        self._on_bytes = on_bytes
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="column-gather", daemon=True)
        self._thread.start()

    def submit(self, tensor: PlannedTensor) -> None:
        self.check()
        self._queue.put(tensor)

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def finish(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self.check()

    def stop(self) -> None:
        """After a failure of the caller: skip what is queued, wait for the thread."""
        self._error = self._error or _Stopped()
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        importlib.import_module("numpy")  # ~0.2 s of Python, here: while the caller's first row copies run in the kernel

        scratch = Scratch()
        with SourceFiles() as files:  # descriptors of its own: the cache is not shared between threads
            while (tensor := self._queue.get()) is not None:
                if self._error is not None:
                    continue  # drain after a failure
                try:
                    out = scratch.get("out", tensor.nbytes).reshape(tensor.shape[0], -1)
                    if not gather_column_bytes(files, tensor.provenance, tensor.sources, out, scratch):
                        raise CheckpointError(f"{tensor.sources[0][0].file}: '{tensor.name}' is not dense")  # planner checked
                    self._writer_of[tensor.name].write(tensor.name, memoryview(out.reshape(-1)))
                    self._on_bytes(out.size)
                except BaseException as err:  # noqa: BLE001 - re-raised on the caller's thread
                    self._error = err


def _stream(plan: PartPlan, writer_of: dict[str, SafetensorsPlacedWriter], on_bytes: Callable[[int], None]) -> None:
    sleep = float(os.environ.get(SLEEP_ENV, "0") or 0)
    gatherer = _ColumnGatherer(writer_of, on_bytes)
    try:
        with SourceFiles() as files:
            copier = RangeCopier(files)
            for group in plan.groups:
                for tensor in group:
                    if isinstance(tensor.provenance, RowCopy):
                        ranges = row_ranges(tensor.provenance, tensor.sources)
                        if ranges is None:  # the planner checked density
                            raise CheckpointError(f"{tensor.sources[0][0].file}: '{tensor.name}' is not dense")
                        writer_of[tensor.name].copy_ranges(tensor.name, ranges, copier)
                        on_bytes(tensor.nbytes)
                    else:
                        gatherer.submit(tensor)
                if sleep:
                    time.sleep(sleep)
    except BaseException:
        gatherer.stop()
        raise
    gatherer.finish()


class _ProgressBar:
    """A byte counter shown with tqdm when ``enabled`` (imported only then), callable from several threads."""

    def __init__(self, total: int, enabled: bool):
        self._bar = None
        self._lock = threading.Lock()
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="consolidate")

    def __enter__(self) -> Callable[[int], None]:
        return self._update

    def _update(self, nbytes: int) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.update(nbytes)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
