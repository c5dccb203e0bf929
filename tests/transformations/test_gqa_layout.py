import json
from pathlib import Path

import pytest

from optimum_neuron_peft import GQAQKVColumnParallelLinearSpec
from optimum_neuron_peft.errors import SpecError
from optimum_neuron_peft.transformations.gqa_layout import (
    check_gqa_shape,
    default_kv_size_multiplier,
    kv_head_indices_for_rank,
    query_head_indices_for_rank,
    valid_kv_size_multipliers,
)

# Per-rank query heads of neuronx-distributed's GQA layer for four configurations (see tests/fixtures/README.md).
REFERENCE = Path(__file__).resolve().parents[1] / "fixtures" / "gqa_query_heads_per_rank.json"


def reference_cases():
    return json.loads(REFERENCE.read_text())["cases"]


@pytest.mark.parametrize("case", reference_cases(), ids=lambda c: f"tp{c['tp_size']}-H{c['num_attention_heads']}-K{c['num_key_value_heads']}-m{c['kv_size_multiplier']}")
def test_compute_query_indices_matches_reference(case):
    got = [
        GQAQKVColumnParallelLinearSpec.compute_query_indices_for_rank(
            case["tp_size"], rank, case["num_attention_heads"], case["num_key_value_heads"], case["kv_size_multiplier"]
        ).tolist()
        for rank in range(case["tp_size"])
    ]
    assert got == case["query_heads_per_rank"]


@pytest.mark.parametrize("H,K", [(32, 8), (32, 4), (8, 2), (14, 2), (40, 8), (32, 32)])
@pytest.mark.parametrize("tp", [1, 2, 4, 8, 16, 32])
@pytest.mark.parametrize("layout", ["tiled", "interleaved"])
def test_every_rank_serves_its_kv_heads_and_all_heads_are_covered(H, K, tp, layout):
    for m in valid_kv_size_multipliers(tp, H, K):
        group = H // K
        all_queries = []
        kv_count = {}
        for rank in range(tp):
            kv = kv_head_indices_for_rank(tp, rank, K, m, layout)
            q = query_head_indices_for_rank(tp, rank, H, K, m, layout)
            assert len(q) == H // tp and len(kv) == K * m // tp
            # Each local query head belongs to the group of the kv slot it attends (q slot i -> kv slot i // share).
            share = len(q) // len(kv)
            assert all(q[i] // group == kv[i // share] for i in range(len(q)))
            all_queries += q
            for head in kv:
                kv_count[head] = kv_count.get(head, 0) + 1
        assert sorted(all_queries) == list(range(H))
        assert kv_count == {head: m for head in range(K)}


def test_interleaved_layout_groups_adjacent_ranks():
    # K=2, m=4, tp=4: replicas 0,0,0,0,1,1,1,1 -> ranks 0-1 hold head 0, ranks 2-3 hold head 1.
    assert [kv_head_indices_for_rank(4, r, 2, 4, "interleaved") for r in range(4)] == [[0, 0], [0, 0], [1, 1], [1, 1]]
    assert [kv_head_indices_for_rank(4, r, 2, 4, "tiled") for r in range(4)] == [[0, 1], [0, 1], [0, 1], [0, 1]]


@pytest.mark.parametrize(
    "tp,H,K,expected",
    [(8, 32, 8, 1), (8, 32, 4, 2), (8, 8, 2, 4), (32, 32, 8, 4), (4, 40, 8, 1), (2, 14, 2, 1), (4, 12, 3, 4)],
)
def test_default_multiplier_is_smallest_valid(tp, H, K, expected):
    assert default_kv_size_multiplier(tp, H, K) == expected
    assert valid_kv_size_multipliers(tp, H, K)[0] == expected


def test_default_multiplier_is_valid_whenever_any_multiplier_is():
    for tp in (1, 2, 3, 4, 6, 8, 12, 16, 32):
        for K in range(1, 17):
            for group in range(1, 9):
                H = K * group
                valid = valid_kv_size_multipliers(tp, H, K)
                if valid:
                    assert default_kv_size_multiplier(tp, H, K) == valid[0]
                else:
                    with pytest.raises(SpecError):
                        default_kv_size_multiplier(tp, H, K)


@pytest.mark.parametrize(
    "tp,H,K,m,message",
    [
        (4, 14, 2, 2, "not divisible by tp_size=4"),
        (8, 32, 4, 3, "not divisible by tp_size=8"),
        (8, 8, 2, 8, "must divide num_attention_heads / num_key_value_heads"),
        (2, 12, 8, 1, "must be a multiple of num_key_value_heads"),
    ],
)
def test_invalid_shapes_are_rejected_with_a_clear_message(tp, H, K, m, message):
    with pytest.raises(SpecError, match=message) as info:
        check_gqa_shape(tp, H, K, m)
    assert f"kv_size_multiplier={m}" in str(info.value)


def test_invalid_multiplier_error_lists_valid_ones():
    with pytest.raises(SpecError, match=r"valid kv_size_multiplier values here: \[2, 4, 8\]"):
        GQAQKVColumnParallelLinearSpec.create(num_attention_heads=32, num_key_value_heads=4, head_dim=8, tp_size=8, kv_size_multiplier=1)
