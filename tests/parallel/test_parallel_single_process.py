"""The tensor-parallel runtime in one process: tp = 1 without any process group, state, validation, attributes."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from parallel_checks import cases

from optimum_neuron_peft.errors import ConfigError
from optimum_neuron_peft.parallel import (
    ColumnParallelLinear,
    GQAQKVColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    TensorParallel,
    copy_tensor_model_parallel_attributes,
    destroy_model_parallel,
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_size,
    initialize_model_parallel,
    model_parallel_is_initialized,
    reduce_kv_replica_gradient,
    set_tensor_model_parallel_attributes,
)
from optimum_neuron_peft.parallel import state as state_module
from optimum_neuron_peft.parallel.state import group_ranks

SINGLE = TensorParallel.single()


@pytest.fixture(autouse=True)
def _clean_state():
    destroy_model_parallel()
    yield
    destroy_model_parallel()


@pytest.mark.parametrize("name", list(cases(1)))
def test_case_at_tp1_without_process_group(name):
    assert not torch.distributed.is_initialized()
    cases(1)[name](SINGLE)  # at tp = 1 no collective may be called: there is no process group to call it on


# ----------------------------------------------------------------------------------------------------------- state
def test_getters_default_to_single_device_without_process_group():
    assert not model_parallel_is_initialized()
    assert (get_tensor_model_parallel_size(), get_tensor_model_parallel_rank()) == (1, 0)
    assert get_tensor_model_parallel_group() is None
    initialize_model_parallel(1)
    assert model_parallel_is_initialized()
    assert TensorParallel.from_state() == SINGLE
    with pytest.raises(ConfigError, match="already initialized"):
        initialize_model_parallel(1)
    destroy_model_parallel()
    assert not model_parallel_is_initialized()


def test_tp_above_one_needs_a_process_group():
    with pytest.raises(ConfigError, match="init_process_group"):
        initialize_model_parallel(2)
    with pytest.raises(ConfigError, match="tensor_model_parallel_size"):
        initialize_model_parallel(0)
    assert not model_parallel_is_initialized()


def test_tp_not_dividing_world_names_both_numbers():
    with pytest.raises(ConfigError, match=r"tensor_model_parallel_size=3.*world size 8"):
        group_ranks(8, 3)


@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3))
def test_group_ranks_partition_the_world(tp, pp, dp):
    world = tp * pp * dp
    groups = group_ranks(world, tp, pp)
    for kind, size in (("tp", tp), ("pp", pp), ("dp", dp)):
        flat = sorted(r for g in groups[kind] for r in g)
        assert flat == list(range(world)), kind
        assert all(len(g) == size for g in groups[kind]), kind
    assert all(g == list(range(g[0], g[0] + tp)) for g in groups["tp"])  # tp fastest-varying: contiguous ranks


def test_tensor_parallel_validates():
    with pytest.raises(ConfigError, match="rank"):
        TensorParallel(size=2, rank=2)
    with pytest.raises(ConfigError, match="size"):
        TensorParallel(size=0, rank=0)
    with pytest.raises(ConfigError, match="TensorParallel"):
        ColumnParallelLinear(4, 4, tp=(1, 0))


def test_neuronx_distributed_state_is_used_when_loaded_and_initialized(monkeypatch):
    fake = types.SimpleNamespace(
        model_parallel_is_initialized=lambda: True,
        get_tensor_model_parallel_size=lambda: 8,
        get_tensor_model_parallel_rank=lambda: 5,
        get_tensor_model_parallel_group=lambda: "nxd-group",
    )
    package, layers = types.ModuleType("neuronx_distributed"), types.ModuleType("neuronx_distributed.parallel_layers")
    layers.parallel_state = fake
    monkeypatch.setitem(sys.modules, "neuronx_distributed", package)
    monkeypatch.setitem(sys.modules, "neuronx_distributed.parallel_layers", layers)
    monkeypatch.setitem(sys.modules, "neuronx_distributed.parallel_layers.parallel_state", fake)
    assert TensorParallel.from_state() == TensorParallel(8, 5, "nxd-group")
    fake.model_parallel_is_initialized = lambda: False
    assert TensorParallel.from_state() == SINGLE


def test_layers_do_not_read_the_state_in_forward(monkeypatch):
    layer = ColumnParallelLinear(8, 8, tp=SINGLE)

    def boom():
        raise AssertionError("forward read the global parallel state")

    monkeypatch.setattr(state_module, "get_tensor_model_parallel_size", boom)
    monkeypatch.setattr(state_module, "_nxd_state", boom)
    layer(torch.randn(2, 8)).sum().backward()


# -------------------------------------------------------------------------------------------- shapes and attributes
def test_parameter_names_shapes_and_attributes():
    tp = TensorParallel(4, 1)  # constructing needs no process group; only forward would communicate
    col = ColumnParallelLinear(8, 16, tp=tp, stride=2)
    row = RowParallelLinear(16, 8, tp=tp, sequence_parallel_enabled=True)
    emb = ParallelEmbedding(32, 8, padding_idx=9, tp=tp)
    assert set(col.state_dict()) == set(row.state_dict()) == {"weight", "bias"} and set(emb.state_dict()) == {"weight"}
    assert col.weight.shape == (4, 8) and col.bias.shape == (4,)
    assert (col.weight.partition_dim, col.weight.partition_stride, col.weight.num_partitions) == (0, 2, 4)
    assert row.weight.shape == (8, 4) and row.weight.partition_dim == 1 and row.bias.shape == (8,)
    assert row.bias.tensor_model_parallel is False and row.bias.sequence_parallel_enabled is True
    assert emb.weight.shape == (8, 8) and (emb.vocab_start_index, emb.vocab_end_index) == (8, 16)
    assert torch.count_nonzero(emb.weight[1]) == 0  # padding id 9 is local row 1 on rank 1


def test_gqa_parameter_names_and_default_multiplier():
    gqa = GQAQKVColumnParallelLinear(16, 8, 2, 4, None, bias=True, tp=TensorParallel(4, 3))
    assert gqa.kv_size_multiplier == 2 and gqa.kv_head_indices == [1]
    assert set(gqa.state_dict()) == {"weight_q", "weight_k", "weight_v", "bias_q", "bias_k", "bias_v"}
    assert gqa.weight_q.shape == (8, 16) and gqa.weight_k.shape == (4, 16)
    fused = GQAQKVColumnParallelLinear(16, 8, 2, 4, 2, fuse_qkv=True, tp=TensorParallel(4, 0))
    assert set(fused.state_dict()) == {"weight_qkv"} and fused.weight_qkv.shape == (16, 16)
    assert fused.weight_qkv.tensor_model_parallel and fused.weight_qkv.partition_dim == 0


def test_gqa_replicas_start_identical():
    gqa = GQAQKVColumnParallelLinear(16, 4, 1, 4, 4, bias=True)  # tp 1: four local replicas of head 0
    for weight in (gqa.weight_k, gqa.weight_v, gqa.bias_k):
        replicas = weight.detach().view(4, 4, *weight.shape[1:])
        assert all(torch.equal(replicas[0], replicas[i]) for i in range(1, 4))


def test_reduce_kv_replica_gradient_sums_slots_of_the_same_head():
    grad = torch.arange(6.0).view(3, 2)  # 3 slots of head_dim 1 holding heads 1, 0, 1
    out = reduce_kv_replica_gradient(grad, torch.tensor([1, 0, 1]), num_key_value_heads=2, head_dim=1, tp=SINGLE)
    torch.testing.assert_close(out, torch.tensor([[4.0, 6.0], [2.0, 3.0], [4.0, 6.0]]), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda tp: ColumnParallelLinear(8, 6, tp=tp), "output_size=6"),
        (lambda tp: ColumnParallelLinear(8, 12, tp=tp, stride=2), "tp size x stride"),
        (lambda tp: RowParallelLinear(6, 8, tp=tp), "input_size=6"),
        (lambda tp: ParallelEmbedding(30, 8, tp=tp), "num_embeddings=30"),
        (lambda tp: GQAQKVColumnParallelLinear(16, 6, 2, 4, 1, tp=tp), "num_attention_heads=6"),
        (lambda tp: GQAQKVColumnParallelLinear(16, 8, 2, 4, 1, tp=tp), "kv_size_multiplier"),
    ],
)
def test_non_divisible_sizes_raise_config_error(build, match):
    with pytest.raises(ConfigError, match=match):
        build(TensorParallel(4, 0))


def test_attribute_helpers():
    src, dst = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    set_tensor_model_parallel_attributes(src, True, 1, 2, 4)
    copy_tensor_model_parallel_attributes(dst, src)
    assert (dst.tensor_model_parallel, dst.partition_dim, dst.partition_stride, dst.num_partitions) == (True, 1, 2, 4)
    with pytest.raises(ConfigError, match="partition_dim"):
        set_tensor_model_parallel_attributes(src, True, 2)
