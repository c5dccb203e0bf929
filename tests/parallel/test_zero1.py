"""ZeRO-1 (optimum_neuron_peft.parallel.zero) on 2 gloo data-parallel ranks against single-process AdamW.

Every check is bit-exact: ZeRO-1 only decides which rank runs the (unchanged) AdamW arithmetic of a parameter and
moves the result, and the gradient all-reduce of two fp32 values and its halving are exact.
"""

from __future__ import annotations

import pytest
import torch
from zero_cases import SHAPES, make_params, plain_run, set_grads, worker

from optimum_neuron_peft.parallel import spawn
from optimum_neuron_peft.parallel.zero import (
    full_optimizer_state_dict,
    load_full_optimizer_state_dict,
    make_zero1_optimizer,
)

pytestmark = pytest.mark.distributed
WORLD = 2


@pytest.fixture(scope="module")
def results():
    return spawn(worker, WORLD, timeout_s=240)


def _equal(got, expected, what):
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{what} {i}")


def test_state_is_sharded_and_covers_every_parameter(results):
    assert {r["optimizer_type"] for r in results} == {"ZeroRedundancyOptimizer"}
    owned = [set(r["local_state_params"]) for r in results]
    assert all(owned), "every rank should own some parameters"
    assert not owned[0] & owned[1], "a parameter's state is held by two ranks"
    assert owned[0] | owned[1] == set(range(len(SHAPES)))


def test_sharded_adamw_equals_single_process_adamw(results):
    expected, expected_state = plain_run(3)
    for rank, r in enumerate(results):
        _equal(r["params_after_3"], [p.detach() for p in expected], f"rank {rank} param")
    full = results[0]["state_after_3"]
    assert results[1]["state_after_3"] is None  # the full dict only on dp rank 0
    assert sorted(full["state"]) == sorted(expected_state["state"])
    for index, state in expected_state["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(full["state"][index][key], value, rtol=0, atol=0, msg=f"state {index} {key}")


def test_save_at_dp2_resume_at_dp1(results):
    """The full state dict saved by the sharded run resumes in a plain optimizer (dp = 1) exactly."""
    expected, _ = plain_run(5)
    params, _ = plain_run(2, state=results[0]["state_after_3"], params=results[0]["params_after_3"], start=3)
    _equal([p.detach() for p in params], [p.detach() for p in expected], "param")


def test_save_at_dp1_resume_at_dp2(results):
    expected, _ = plain_run(5)
    for rank, r in enumerate(results):
        _equal(r["resumed_params_after_5"], [p.detach() for p in expected], f"rank {rank} param")


def test_gradients_averaged_over_data_parallel_ranks(results):
    params = make_params()
    set_grads(params, 0)
    # rank r contributed grad + r; the fp32 sum in rank order, then divided by the group size
    expected = [sum((p.grad + float(r) for r in range(1, WORLD)), p.grad + 0.0) / WORLD for p in params]
    for rank, r in enumerate(results):
        _equal(r["reduced_grads"], expected, f"rank {rank} grad")


def test_single_process_gets_the_plain_optimizer_and_round_trips():
    params = make_params()
    opt = make_zero1_optimizer(params, torch.optim.AdamW, lr=0.05)
    assert type(opt) is torch.optim.AdamW
    set_grads(params, 0)
    opt.step()
    state = full_optimizer_state_dict(opt)
    other = torch.optim.AdamW(make_params(), lr=0.05)
    load_full_optimizer_state_dict(other, state)
    assert other.state_dict()["state"].keys() == state["state"].keys()


def test_bad_optimizer_class_is_refused():
    from optimum_neuron_peft.errors import ConfigError

    with pytest.raises(ConfigError, match="optimizer_cls"):
        make_zero1_optimizer(make_params(), "adamw")
