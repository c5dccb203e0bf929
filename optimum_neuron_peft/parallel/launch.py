"""Start a group of processes on this machine (tests, demo, benchmarks) or join one started by ``torchrun``.

`spawn` runs ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes (start method "spawn": nothing of
the parent's torch state is inherited), each inside an initialized process group, and returns every rank's result.
A failure on any rank raises `WorkerError` in the parent with that rank's traceback text, and the other ranks are
stopped (they would otherwise wait forever in their next collective).
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue as queue_lib
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..errors import ConfigError
from .state import destroy_model_parallel

DEFAULT_TIMEOUT_S = 300.0


class WorkerError(RuntimeError):
    """A spawned rank raised, died, or the group ran past its timeout. ``rank`` is None for a timeout."""

    def __init__(self, message: str, rank: int | None = None, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.rank = rank
        self.remote_traceback = remote_traceback


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout_s: float,
    num_threads: int | None,
    fn: Callable[..., Any],
    args: tuple,
    results: Any,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )  # fmt: skip
    if num_threads is not None:
        torch.set_num_threads(num_threads)  # world_size processes share few cores; oversubscription is slower
    try:
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s)
        )
        # Pickle here, not in the queue's feeder thread, so an unpicklable result is reported as this rank's error.
        payload = ("ok", pickle.dumps(fn(rank, world_size, *args)))
    except BaseException:
        payload = ("error", traceback.format_exc())
    # Report before tearing down: a failed rank's peers only notice when its connections close, and the parent
    # should see the root cause first.
    results.put((rank, *payload))
    try:
        destroy_model_parallel()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    num_threads: int | None = 1,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` new processes; return the results in rank order.

    ``fn`` must be a module-level function (it is pickled by name) and its return value picklable. Every worker
    initializes the default process group (MASTER_ADDR=127.0.0.1, a free port) and always destroys it, and calls
    ``torch.set_num_threads(num_threads)`` unless ``num_threads`` is None. Raises `WorkerError` naming the first
    failing rank with its traceback, or after ``timeout_s`` seconds.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"spawn: world_size must be an int >= 1, got {world_size!r}")
    if getattr(fn, "__qualname__", "").count("<") or getattr(fn, "__name__", "") == "<lambda>":
        raise ConfigError(f"spawn: fn must be a module-level function (pickled by name), got {fn!r}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, port, backend, timeout_s, num_threads, fn, args, results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    try:
        outputs = _collect(procs, results, world_size, timeout_s)
    except BaseException:
        _stop(procs, grace_s=0.0)  # peers of a failed rank may be stuck in a collective: do not wait for them
        raise
    finally:
        results.close()
    _stop(procs, grace_s=10.0)
    return outputs


def _collect(procs: list, results: Any, world_size: int, timeout_s: float) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    outputs: dict[int, Any] = {}
    errors: dict[int, str] = {}
    while len(outputs) < world_size:
        try:
            rank, status, payload = results.get(timeout=0.2)
        except queue_lib.Empty:
            dead = [r for r, p in enumerate(procs) if r not in outputs and p.exitcode not in (None, 0)]
            if dead:
                _drain(results, outputs, errors, wait_s=0.5)  # a rank that exited may have a message in flight
                if errors:
                    break
                raise WorkerError(
                    f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} without reporting a result",
                    rank=dead[0],
                ) from None
            if time.monotonic() > deadline:
                missing = sorted(set(range(world_size)) - set(outputs))
                raise WorkerError(f"spawn: ranks {missing} did not finish within {timeout_s:.0f} s") from None
            continue
        if status == "error":
            errors[rank] = payload
            _drain(results, outputs, errors, wait_s=1.0)  # peers usually fail right after; show them all
            break
        outputs[rank] = pickle.loads(payload)
    if errors:
        first = next(iter(errors))  # the first reported failure is the root cause; peers fail because of it
        text = "\n".join(f"--- rank {rank} ---\n{tb}" for rank, tb in errors.items())
        raise WorkerError(f"rank {first} failed:\n{text}", rank=first, remote_traceback=errors[first])
    return [outputs[rank] for rank in range(world_size)]


def _drain(results: Any, outputs: dict[int, Any], errors: dict[int, str], wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            rank, status, payload = results.get(timeout=left)
        except queue_lib.Empty:
            return
        if status == "error":
            errors[rank] = payload
        else:
            outputs[rank] = pickle.loads(payload)


def _stop(procs: list, grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join()


def init_distributed_from_env(
    backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, init_method: str | None = None
) -> tuple[int, int]:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    Returns (rank, world_size). Already initialized: returns its values. ``backend`` defaults to "nccl" when CUDA
    is available and "gloo" otherwise. ``backend="xla"`` (Trainium) registers torch_xla's backend and rendezvous
    through ``init_method="xla://"``, which takes the group from the Neuron runtime instead of the environment. An
    explicit ``init_method`` (``file://``, ``tcp://``, ``xla://``) is passed through, with RANK / WORLD_SIZE from the
    environment when they are set.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if backend == "xla" and init_method is None:
        init_method = "xla://"
    if backend == "xla":
        try:
            import torch_xla.distributed.xla_backend  # noqa: F401  (registers the "xla" backend)
        except ImportError:
            raise ConfigError("init_distributed_from_env: backend 'xla' needs torch_xla (torch-neuronx on Trainium), "
                              "which is not installed") from None
    if init_method is None:
        missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise ConfigError(
                f"init_distributed_from_env: environment variables {missing} are not set; launch with torchrun "
                "(or use launch.spawn for a local group)"
            )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    ranks = {}
    if init_method is not None and "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        ranks = dict(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    dist.init_process_group(backend, init_method=init_method, timeout=datetime.timedelta(seconds=timeout_s), **ranks)
    return dist.get_rank(), dist.get_world_size()
