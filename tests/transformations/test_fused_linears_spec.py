"""FusedLinearsSpec: column and row fusion, any number of linears, unequal dims, bias, LoRA; bit-exact round trips."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_neuron_peft import FusedLinearsSpec, create_local_fused_weight
from optimum_neuron_peft.errors import SpecError
from optimum_neuron_peft.transformations.sharding import shard_tensor
from spec_cases import assert_bit_exact, shard_all_ranks


def fused_original(dims, other, fuse_axis, bias, dtype, lora_r=0, seed=0, names=None):
    g = torch.Generator().manual_seed(seed)
    names = names or [f"lin{i}" for i in range(len(dims))]
    sd = {}
    for name, d in zip(names, dims):
        shape = (d, other) if fuse_axis == 0 else (other, d)
        sd[f"mlp.{name}.weight"] = torch.randn(*shape, generator=g).to(dtype)
        if bias:
            sd[f"mlp.{name}.bias"] = torch.randn(d if fuse_axis == 0 else other, generator=g).to(dtype)
        if lora_r:
            sd[f"mlp.{name}.lora_A.weight"] = torch.randn(lora_r, shape[1], generator=g).to(dtype)
            sd[f"mlp.{name}.lora_B.weight"] = torch.randn(shape[0], lora_r, generator=g).to(dtype)
    return names, sd


@settings(max_examples=120, deadline=None)
@given(
    n=st.integers(1, 4),
    tp=st.sampled_from([1, 2, 4, 8]),
    units=st.lists(st.integers(1, 3), min_size=4, max_size=4),
    other=st.integers(1, 5),
    fuse_axis=st.sampled_from([0, 1, "column", "row"]),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    lora_r=st.integers(0, 2),
)
def test_round_trip_property(n, tp, units, other, fuse_axis, bias, dtype, lora_r):
    dims = [u * tp for u in units[:n]]  # unequal original dims, each divisible by tp
    axis = {"column": 0, "row": 1}.get(fuse_axis, fuse_axis)
    names, original = fused_original(dims, other, axis, bias, dtype, lora_r)
    spec = FusedLinearsSpec(fused_linear_name="fused", linear_names=names, bias=bias, fuse_axis=fuse_axis, original_dims=dims, tp_size=tp)
    sharded = shard_all_ranks(spec, "mlp", original)
    rebuilt, consumed = spec.to_original_weights("mlp", sharded, {})
    assert sorted(consumed) == sorted(sharded)
    assert_bit_exact(rebuilt, original)


def test_column_layout_is_neuronx_strided_sharding():
    # Equal dims: [gate_r ; up_r] on each rank is stride-2 sharding of the fused [gate ; up] weight.
    names, original = fused_original([8, 8], 3, 0, False, torch.float32, names=["gate_proj", "up_proj"])
    spec = FusedLinearsSpec("gate_up_proj", names, False, "column", [8, 8], tp_size=4)
    fused_full = torch.cat([original["mlp.gate_proj.weight"], original["mlp.up_proj.weight"]])
    for rank in range(4):
        local, _ = spec.adapt_state_dict("mlp", original, rank)
        expected = shard_tensor(fused_full, 0, 4, rank, stride=2)
        torch.testing.assert_close(local["mlp.gate_up_proj.weight"], expected, rtol=0, atol=0)
        torch.testing.assert_close(
            local["mlp.gate_up_proj.weight"],
            create_local_fused_weight(rank, 4, [original["mlp.gate_proj.weight"], original["mlp.up_proj.weight"]], 0, 0),
            rtol=0, atol=0,
        )


def test_row_fusion_layout_and_bias():
    names, original = fused_original([4, 8], 3, 1, True, torch.float32)
    spec = FusedLinearsSpec("fused", names, True, "row", [4, 8], tp_size=2)
    local, _ = spec.adapt_state_dict("mlp", original, 1)
    expected = torch.cat([original["mlp.lin0.weight"][:, 2:4], original["mlp.lin1.weight"][:, 4:8]], dim=1)
    torch.testing.assert_close(local["mlp.fused.weight"], expected, rtol=0, atol=0)
    # the fused row linear sums outputs, so the biases stay whole and concatenated on every rank
    torch.testing.assert_close(local["mlp.fused.bias"], torch.cat([original["mlp.lin0.bias"], original["mlp.lin1.bias"]]), rtol=0, atol=0)


def test_reads_optimum_neuron_shared_lora_a():
    names, original = fused_original([4, 4], 3, 0, False, torch.float32, lora_r=2, names=["gate_proj", "up_proj"])
    spec = FusedLinearsSpec("gate_up_proj", names, False, 0, [4, 4], tp_size=2)
    a = original["mlp.gate_proj.lora_A.weight"]
    b = [create_local_fused_weight(r, 2, [original["mlp.gate_proj.lora_B.weight"], original["mlp.up_proj.lora_B.weight"]], 0, 0) for r in range(2)]
    rebuilt, consumed = spec.to_original_weights("mlp", {"mlp.gate_up_proj.lora_A.weight": [a, a], "mlp.gate_up_proj.lora_B.weight": b}, {})
    assert sorted(consumed) == ["mlp.gate_up_proj.lora_A.weight", "mlp.gate_up_proj.lora_B.weight"]
    for n in names:
        torch.testing.assert_close(rebuilt[f"mlp.{n}.lora_A.weight"], a, rtol=0, atol=0)
        torch.testing.assert_close(rebuilt[f"mlp.{n}.lora_B.weight"], original[f"mlp.{n}.lora_B.weight"], rtol=0, atol=0)


def test_bad_input():
    with pytest.raises(SpecError, match=r"up_proj has 6 outputs, not divisible by tp_size=4"):
        FusedLinearsSpec("gate_up_proj", ["gate_proj", "up_proj"], False, 0, [8, 6], tp_size=4)
    with pytest.raises(SpecError, match="one original dim per linear"):
        FusedLinearsSpec("f", ["a", "b"], False, 0, [8], tp_size=1)
    with pytest.raises(SpecError, match="fuse_axis must be"):
        FusedLinearsSpec("f", ["a"], False, 2, [8], tp_size=1)
    names, original = fused_original([4, 4], 3, 0, False, torch.float32, names=["gate_proj", "up_proj"])
    spec = FusedLinearsSpec("gate_up_proj", names, False, 0, [4, 4], tp_size=2)
    with pytest.raises(SpecError, match=r"mlp.gate_up_proj.weight: missing original tensors \['mlp.up_proj.weight'\]"):
        spec.adapt_state_dict("mlp", {"mlp.gate_proj.weight": original["mlp.gate_proj.weight"]}, 0)
    with pytest.raises(SpecError, match=r"mlp.up_proj.weight: expected a 2-D weight with 4 rows, found shape \(5, 3\)"):
        spec.adapt_state_dict("mlp", dict(original, **{"mlp.up_proj.weight": torch.zeros(5, 3)}), 0)
    sharded = shard_all_ranks(spec, "mlp", original)
    with pytest.raises(SpecError, match=r"mlp.gate_up_proj.weight: rank 1 holds shape \(3, 3\), expected 4 entries"):
        spec.to_original_weights("mlp", {"mlp.gate_up_proj.weight": [sharded["mlp.gate_up_proj.weight"][0], torch.zeros(3, 3)]}, {})
