"""Our tensor-parallel LoRA trains exactly what vanilla PEFT trains, at tp = 1, 2 and 4.

For every case of `peft_cases.CASES` (full / partial / regex targets, fused and separate q/k/v, GQA with kv
multiplier 2 at tp = 4, sequence parallelism, embedding and lm_head LoRA, rsLoRA, rank/alpha patterns, two active
adapters): a vanilla PEFT adapter loads bit-exactly, the logits equal vanilla PEFT's, K SGD steps on the same batches
give the same adapter after consolidation, and merge / unmerge work on the shards. Initial adapters of
`get_peft_model` do not depend on tp. tp = 1 runs in this process; tp = 4 and tp = 2 (two data-parallel replicas)
in one spawn of 4 gloo ranks.
"""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from peft_cases import CASES, INIT_CONFIGS, build_references, run_all, worker

from optimum_neuron_peft.parallel import spawn

pytestmark = pytest.mark.distributed
TP_SIZES = [1, 2, 4]
ATOL = 2e-5  # fp32, 3 SGD steps; the reductions differ only in summation order


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[dict, dict[int, dict]]:
    root = Path(tmp_path_factory.mktemp("peft_equivalence"))
    refs = build_references(root)
    results = {1: run_all(root, 0)}
    results.update(spawn(worker, 4, str(root), [4, 2], timeout_s=400)[0])
    results["root"] = root
    return refs, results


CASE_IDS = [c.name for c in CASES]


def _cases(tp_sizes=TP_SIZES):
    return [pytest.param(tp, case, id=f"tp{tp}-{case.name}") for tp in tp_sizes for case in CASES]


@pytest.mark.parametrize("tp,case", _cases())
def test_vanilla_adapter_loads_bit_exactly(setup, tp, case):
    refs, results = setup
    for adapter in case.configs:
        expected, got = refs[case.name]["initial"][adapter], results[tp][case.name]["loaded"][adapter]
        assert sorted(got) == sorted(expected)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("tp,case", _cases())
def test_logits_equal_vanilla_peft(setup, tp, case):
    refs, results = setup
    torch.testing.assert_close(results[tp][case.name]["logits"], refs[case.name]["logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("tp,case", _cases())
def test_training_equals_vanilla_peft(setup, tp, case):
    refs, results = setup
    for adapter in case.configs:
        expected, got = refs[case.name]["trained"][adapter], results[tp][case.name]["trained"][adapter]
        initial = refs[case.name]["initial"][adapter]
        assert sorted(got) == sorted(expected)
        moved = max((expected[n] - initial[n]).abs().max().item() for n in expected)
        assert moved > 1e-2, "the reference adapter did not train: the comparison would prove nothing"
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=ATOL, msg=name)


@pytest.mark.parametrize("tp,case", _cases())
def test_merge_then_unmerge_on_shards(setup, tp, case):
    _, results = setup
    out = results[tp][case.name]
    assert out["merge_max_diff"] < 1e-3  # logits of order 10 after training; fp32 merge rounding
    assert out["unmerge_exact"], "unmerge_adapter did not restore the base weights bit-exactly"


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("init", sorted(INIT_CONFIGS))
def test_initial_adapter_does_not_depend_on_tp(setup, tp, init):
    _, results = setup
    expected, got = results[1]["init"][init], results[tp]["init"][init]
    assert sorted(got) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    assert any(t.abs().sum() > 0 for n, t in got.items() if "lora_A" in n or "lora_embedding_B" in n)


@pytest.mark.parametrize("tp,case", _cases())
def test_sharded_save_consolidates_to_the_vanilla_adapter(setup, tp, case, tmp_path):
    """save_pretrained (sharded, every rank) -> checkpoint.consolidate -> vanilla PEFT loads it: bit-exact."""
    from optimum_neuron_peft.checkpoint.consolidate import consolidate
    from safetensors.torch import load_file

    refs, results = setup
    root = results["root"]
    for adapter in case.configs:
        saved = root / "sharded" / f"{case.name}_tp{tp}"
        saved = saved if adapter == "default" else saved / adapter
        out = tmp_path / adapter
        consolidate(saved, out)
        config = peft.LoraConfig.from_pretrained(str(out))
        # What vanilla PEFT itself saved (all-linear is saved expanded to full module names).
        vanilla = root / case.name if adapter == "default" else root / case.name / adapter
        expected_config = peft.LoraConfig.from_pretrained(str(vanilla))
        assert config.target_modules == expected_config.target_modules
        assert (config.r, config.rank_pattern, config.alpha_pattern) == (expected_config.r, expected_config.rank_pattern, expected_config.alpha_pattern)
        tensors = {k.removeprefix("base_model.model."): v for k, v in load_file(str(out / "adapter_model.safetensors")).items()}
        expected = {k: v for k, v in refs[case.name]["initial"][adapter].items() if "base_layer" not in k}
        assert sorted(tensors) == sorted(expected)
        for name in expected:
            torch.testing.assert_close(tensors[name], expected[name], rtol=0, atol=0, msg=name)
