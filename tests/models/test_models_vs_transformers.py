"""Our tensor-parallel models against Transformers: logits, loss, every gradient, and 3 SGD-with-momentum steps of full fine-tuning (Adam would amplify float noise on near-zero gradients).

One spawn per tp size (1 runs in-process) runs the whole case table; the parent asserts each (case, tp) separately.
Gradients and trained weights are consolidated through the weight transformation specs before the comparison.
"""

from __future__ import annotations

import pytest
import torch
from model_cases import FORWARD_CASES, TRAIN_CASES, reference, run_cases

from optimum_neuron_peft.parallel import spawn

TP_SIZES = [1, 2, 4]
TOL = {"atol": 1e-5, "rtol": 1e-4}

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {case.name: reference(case, root) for case in FORWARD_CASES + TRAIN_CASES}


@pytest.fixture(scope="module")
def results(references):
    out = {}
    for tp in TP_SIZES:
        table = [(case, references[case.name]["path"]) for case in FORWARD_CASES]
        if tp == 2:
            table += [(case, references[case.name]["path"]) for case in TRAIN_CASES]
        out[tp] = [run_cases(0, 1, table)] if tp == 1 else spawn(run_cases, tp, table, timeout_s=300)
    return out


def _result(results, tp, name):
    per_rank = results[tp]
    for rank, r in enumerate(per_rank):
        assert "error" not in r[name], f"rank {rank}:\n{r[name]['error']}"
    return per_rank


@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize("case", FORWARD_CASES, ids=lambda c: c.name)
def test_forward_backward_matches_transformers(results, references, tp, case):
    per_rank = _result(results, tp, case.name)
    ref = references[case.name]
    ours = per_rank[0][case.name]
    torch.testing.assert_close(ours["logits"], ref["logits"], **TOL)
    for rank, r in enumerate(per_rank):
        torch.testing.assert_close(r[case.name]["loss"], ref["loss"], **TOL, msg=lambda m: f"loss on rank {rank}: {m}")
    assert sorted(ours["grads"]) == sorted(ref["grads"])
    for name, grad in ref["grads"].items():
        torch.testing.assert_close(ours["grads"][name], grad, **TOL, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("case", TRAIN_CASES, ids=lambda c: c.name)
def test_sgd_steps_match_transformers(results, references, case):
    per_rank = _result(results, 2, case.name)
    ref = references[case.name]["weights"]
    ours = per_rank[0][case.name]["weights"]
    assert sorted(ours) == sorted(ref)
    for name, weight in ref.items():
        torch.testing.assert_close(ours[name], weight, **TOL, msg=lambda m: f"{name} after training: {m}")
    for r in per_rank:
        assert r[case.name]["replica_mismatch"] == 0.0  # key/value replicas received identical updates


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_size_not_matching_world_size_is_refused(results, tp):
    for r in results[tp]:
        assert "does not match the world size" in r["world_mismatch"], r["world_mismatch"]
