import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_neuron_peft import create_local_weight_with_padding
from optimum_neuron_peft.errors import SpecError
from optimum_neuron_peft.transformations.sharding import shard_tensor, unshard_tensors


def test_padding_really_pads_and_unpadding_restores():
    full = torch.arange(1, 11, dtype=torch.float32).reshape(10, 1)  # 10 rows over tp=4 -> 3 rows each, 2 padded
    shards = [create_local_weight_with_padding(full, 0, 1, 4, r) for r in range(4)]
    assert [s.shape[0] for s in shards] == [3, 3, 3, 3]
    assert shards[3].flatten().tolist() == [10.0, 0.0, 0.0]
    torch.testing.assert_close(unshard_tensors(shards, 0, full_size=10), full, rtol=0, atol=0)
    assert unshard_tensors(shards, 0).shape[0] == 12  # without full_size the padding is visible


@settings(max_examples=100, deadline=None)
@given(
    size=st.integers(1, 40), other=st.integers(1, 4), tp=st.sampled_from([1, 2, 3, 4, 8]),
    stride=st.sampled_from([1, 2, 3]), dim=st.sampled_from([0, 1]),
)
def test_padded_round_trip_property(size, other, tp, stride, dim):
    full = torch.randn((size, other) if dim == 0 else (other, size))
    shards = [create_local_weight_with_padding(full, dim, stride, tp, r) for r in range(tp)]
    assert len({s.shape for s in shards}) == 1
    torch.testing.assert_close(unshard_tensors(shards, dim, stride, full_size=size), full, rtol=0, atol=0)


def test_strided_sharding_follows_the_neuronx_rule():
    full = torch.arange(16).reshape(16, 1)
    # tp=2, stride=2: 4 chunks of 4; rank 0 takes chunks 0 and 2, rank 1 chunks 1 and 3
    assert shard_tensor(full, 0, 2, 0, stride=2).flatten().tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert shard_tensor(full, 0, 2, 1, stride=2).flatten().tolist() == [4, 5, 6, 7, 12, 13, 14, 15]


def test_errors_name_the_tensor():
    with pytest.raises(SpecError, match=r"embed: cannot shard a dimension of size 10 over tp_size=4"):
        shard_tensor(torch.zeros(10, 2), 0, 4, 0, name="embed")
    with pytest.raises(SpecError, match="same shape"):
        unshard_tensors([torch.zeros(2, 2), torch.zeros(3, 2)], 0, name="x")
