"""The local launcher: failures come back with the failing rank's traceback and never hang the parent."""

from __future__ import annotations

import sys
import time

import pytest
import torch.distributed as dist

from optimum_neuron_peft.errors import ConfigError
from optimum_neuron_peft.parallel import WorkerError, init_distributed_from_env, spawn


def fail_on_rank_one(rank: int, world_size: int, message: str) -> int:
    if rank == 1:
        raise ValueError(message)
    dist.barrier()  # rank 0 waits for a peer that never comes: the launcher must stop it
    return rank


@pytest.mark.distributed
def test_spawn_reports_failing_rank_traceback_without_hanging():
    start = time.monotonic()
    with pytest.raises(WorkerError) as info:
        spawn(fail_on_rank_one, 2, "boom from rank one", timeout_s=60)
    assert time.monotonic() - start < 45
    assert info.value.rank == 1
    assert "boom from rank one" in info.value.remote_traceback
    assert "ValueError" in str(info.value) and "fail_on_rank_one" in str(info.value)


def test_spawn_rejects_lambdas_and_bad_world_sizes():
    with pytest.raises(ConfigError, match="module-level"):
        spawn(lambda rank, world: rank, 2)
    with pytest.raises(ConfigError, match="world_size"):
        spawn(fail_on_rank_one, 0)


def test_init_distributed_from_env_names_missing_variables(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        init_distributed_from_env()


def test_init_distributed_with_an_explicit_init_method(monkeypatch, tmp_path):
    # No MASTER_ADDR / MASTER_PORT: the init method does the rendezvous (as "xla://" does on Trainium).
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    try:
        assert init_distributed_from_env("gloo", init_method=f"file://{tmp_path / 'store'}") == (0, 1)
        assert dist.get_backend() == "gloo"
    finally:
        dist.destroy_process_group()


def test_init_distributed_xla_without_torch_xla_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_xla", None)  # absent, even where a placeholder package is installed
    with pytest.raises(ConfigError, match="backend 'xla' needs torch_xla"):
        init_distributed_from_env("xla")
