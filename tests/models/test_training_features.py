"""Activation checkpointing and automatic sequence-parallel gradient reduction, at tp = 1 and tp = 2 (+SP).

- Checkpointing recomputes each decoder layer (its collectives included) in backward: gradients are bit-identical
  to the run without it, in fp32, with dropout 0 and with dropout 0.1 (attention and LoRA dropout; the RNG state is
  replayed by torch.utils.checkpoint), for full fine-tuning and for LoRA.
- Sequence parallelism needs no manual call any more: the gradients of a sequence-parallel run equal those of the
  same tp without it, and the old `allreduce_sequence_parallel_gradients()` call changes nothing (no double
  reduction). Tolerance 1e-6 (fp32): SP sums the norm-weight and bias gradients over each rank's sequence chunk,
  then over ranks - another summation order of the same terms, nothing else differs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from training_features import CONFIGS, build_base, run_all, worker

from optimum_neuron_peft.parallel import spawn

pytestmark = pytest.mark.distributed
SP_ATOL = 1e-6


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[int, list[dict]]:
    root = Path(tmp_path_factory.mktemp("training_features"))
    for dropout in (0.0, 0.1):
        build_base(root, dropout)
    return {1: [run_all(root, 1)], 2: spawn(worker, 2, str(root), timeout_s=300)}


def _pairs(tp_sizes=(1, 2)):
    for tp in tp_sizes:
        for name, _, _, sp, ckpt in CONFIGS:
            if ckpt and not (sp and tp == 1):
                yield pytest.param(tp, name.replace("ckpt1", "ckpt0"), name, id=f"tp{tp}-{name}")


@pytest.mark.parametrize("tp,plain,checkpointed", list(_pairs()))
def test_checkpointing_gives_bit_identical_gradients(results, tp, plain, checkpointed):
    for rank, per_rank in enumerate(results[tp]):
        a, b = per_rank[plain], per_rank[checkpointed]
        assert (a["layer0_forward_runs"], b["layer0_forward_runs"]) == (1, 2), "no recomputation happened"
        assert torch.equal(a["loss"], b["loss"]), f"rank {rank}: the loss changed"
        assert sorted(a["grads"]) == sorted(b["grads"])
        assert any(g.abs().sum() > 0 for g in a["grads"].values())
        for name in a["grads"]:
            torch.testing.assert_close(b["grads"][name], a["grads"][name], rtol=0, atol=0, msg=f"rank {rank} {name}")


def test_dropout_is_active_in_the_dropout_configurations(results):
    """Otherwise the dropout half of the checkpointing test would prove nothing about the RNG replay."""
    per_rank = results[1][0]
    for kind in ("full", "lora"):
        assert not torch.equal(per_rank[f"{kind}_drop0.0_sp0_ckpt0"]["loss"], per_rank[f"{kind}_drop0.1_sp0_ckpt0"]["loss"])


@pytest.mark.parametrize("name", [n.replace("_sp0", "_sp1") for n, _, dropout, sp, _ in CONFIGS if not sp and dropout == 0])
def test_sequence_parallel_gradients_equal_the_non_sp_run_without_a_manual_call(results, name):
    for rank, per_rank in enumerate(results[2]):
        sp, plain = per_rank[name], per_rank[name.replace("_sp1", "_sp0")]
        torch.testing.assert_close(sp["loss"], plain["loss"], rtol=0, atol=SP_ATOL)
        assert sorted(sp["grads"]) == sorted(plain["grads"])
        for param, grad in plain["grads"].items():
            torch.testing.assert_close(sp["grads"][param], grad, rtol=0, atol=SP_ATOL, msg=f"rank {rank} {param}")


@pytest.mark.parametrize("tp", [1, 2])
def test_manual_sequence_parallel_call_is_idempotent(results, tp):
    for rank, per_rank in enumerate(results[tp]):
        for name, out in per_rank.items():
            assert out["manual_call_changed_nothing"], f"rank {rank} {name}"
