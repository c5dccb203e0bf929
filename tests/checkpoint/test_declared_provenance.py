"""The declared layouts (`checkpoint.declared`, torch-free) against `provenance.derive` run on the specs themselves:
same outputs, in the same order, with the same shapes and byte provenance, over a grid of configurations."""

from __future__ import annotations

import itertools

import pytest
import torch

from optimum_neuron_peft.checkpoint.declared import (
    DECLARED_SPECS,
    GroupShapes,
    Unsupported,
    declared_spec,
    group_outputs,
    parameter_output,
)
from optimum_neuron_peft.transformations.pieces import ColumnGather, RowCopy
from optimum_neuron_peft.transformations import (
    SPEC_REGISTRY,
    FusedLinearsSpec,
    GQAQKVColumnParallelLinearSpec,
    ModelWeightTransformationSpecs,
    create_local_weight_with_padding,
    valid_kv_size_multipliers,
)
from optimum_neuron_peft.transformations.model import to_original_weights

from provenance_oracle import SourceInfo, derive

MODULE = "model.layers.3.block"


def _canonical(provenance, sources):
    """A column gather of every column of one shard is that shard's rows: the same bytes. (`derive` finds either
    form for it, depending on whether the rebuild also runs on row ids; the declared layouts say rows.)"""
    if isinstance(provenance, ColumnGather) and len(provenance.pieces) == 1:
        k, r, first, stop = provenance.pieces[0]
        shape = sources[k][1][r].shape
        if (first, stop) == (0, shape[1]):
            return RowCopy(((k, r, 0, shape[0]),))
    return provenance


def _check_group(specs: ModelWeightTransformationSpecs | None, local: dict[str, list[torch.Tensor]], parameters: dict) -> None:
    """Declared outputs of one group == what the torch engine plans for it (dry run + `derive`)."""
    spec_list = [] if specs is None else list(specs)
    rebuild = lambda index: to_original_weights([specs] if specs is not None else [], index, parameters)  # noqa: E731
    expected = rebuild(local)
    sources = [(name, [SourceInfo(tuple(t.shape), t.dtype) for t in ranks]) for name, ranks in local.items()]
    provenance = derive(rebuild, sources, {n: (tuple(t.shape), t.dtype) for n, t in expected.items()})
    provenance = {n: _canonical(p, sources) for n, p in provenance.items()}
    assert sorted(provenance) == sorted(expected), "every output of these specs is a byte move"
    tp = len(next(iter(local.values())))
    group = GroupShapes(list(local), {n: tuple(ranks[0].shape) for n, ranks in local.items()}, tp)
    declared = group_outputs(
        MODULE if specs is not None else None, [declared_spec(type(s).__name__, s.to_dict()) for s in spec_list], group, parameters
    )
    assert [(o.name, o.shape) for o in declared] == [(n, tuple(t.shape)) for n, t in expected.items()]
    assert {o.name: o.provenance for o in declared} == provenance
    for o in declared:  # the dtype (and bytes) come from the declared source
        assert all(piece[0] == o.source for piece in o.provenance.pieces)
    for spec in spec_list:
        assert declared_spec(type(spec).__name__, spec.to_dict()).relevant_names(MODULE) == spec.get_relevant_parameter_names(MODULE)


def _shards(spec, state: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    per_rank = [spec.adapt_state_dict(MODULE, state, rank)[0] for rank in range(spec.tp_size)]
    return {name: [local[name] for local in per_rank] for name in per_rank[0]}


def _gqa_cases():
    for tp, (H, K) in itertools.product([1, 2, 4, 8], [(8, 8), (8, 2), (16, 4), (8, 1), (16, 2)]):
        for m in valid_kv_size_multipliers(tp, H, K):
            for fuse_qkv, bias, layout in itertools.product([False, True], [False, True], ["tiled", "interleaved"]):
                yield tp, H, K, m, fuse_qkv, bias, layout


GQA_CASES = list(_gqa_cases())


def test_the_grid_covers_replication():
    assert any(m > 1 for _, _, _, m, *_ in GQA_CASES) and any(tp == 8 for tp, *_ in GQA_CASES)


@pytest.mark.parametrize("tp,H,K,m,fuse_qkv,bias,layout", GQA_CASES)
def test_gqa_qkv_declared_equals_derived(tp, H, K, m, fuse_qkv, bias, layout):
    head_dim, hidden = 4, 12
    spec = GQAQKVColumnParallelLinearSpec.create(
        num_attention_heads=H, num_key_value_heads=K, head_dim=head_dim, tp_size=tp, kv_size_multiplier=m,
        fuse_qkv=fuse_qkv, bias=bias, kv_layout=layout,
    )
    state = {f"{MODULE}.{p}_proj.weight": torch.zeros(n * head_dim, hidden) for p, n in (("q", H), ("k", K), ("v", K))}
    state[f"{MODULE}.o_proj.weight"] = torch.zeros(hidden, H * head_dim)
    if bias:
        state.update({f"{MODULE}.{p}_proj.bias": torch.zeros(n * head_dim) for p, n in (("q", H), ("k", K), ("v", K))})
    local = _shards(spec, state)
    parameters = {}
    if bias:  # o_proj's bias is no spec's: it goes through the parameter path inside the group
        local[f"{MODULE}.o_proj.bias"] = [torch.zeros(hidden, dtype=torch.bfloat16)] * tp
        parameters[f"{MODULE}.o_proj.bias"] = {"tensor_model_parallel": False}
    local = {n: [t.to(torch.bfloat16) for t in ranks] for n, ranks in local.items()}
    _check_group(ModelWeightTransformationSpecs(MODULE, [spec]), local, parameters)


@pytest.mark.parametrize(
    "tp,fuse_axis,bias,dims",
    [(tp, axis, bias, dims) for tp in (1, 2, 4, 8) for axis in (0, 1, "column") for bias in (False, True)
     for dims in ([16, 16], [8, 24, 16])],
)  # fmt: skip
def test_fused_linears_declared_equals_derived(tp, fuse_axis, bias, dims):
    spec = FusedLinearsSpec("gate_up_proj", [f"p{i}" for i in range(len(dims))], bias, fuse_axis, dims, tp_size=tp)
    axis = spec.fuse_axis
    state = {}
    for i, d in enumerate(dims):
        state[f"{MODULE}.p{i}.weight"] = torch.zeros((d, 6) if axis == 0 else (6, d))
        if bias:
            state[f"{MODULE}.p{i}.bias"] = torch.zeros(d if axis == 0 else 6)
    _check_group(ModelWeightTransformationSpecs(MODULE, [spec]), _shards(spec, state), {})


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize(
    "shape,entry",
    [((16, 24), {"tensor_model_parallel": False}), ((40,), {"tensor_model_parallel": False})]
    + [((16, 24), {"tensor_model_parallel": True, "partition_dim": d, "partition_stride": s, "num_partitions": None})
       for d in (0, 1) for s in (1, 2)]
    + [((32,), {"tensor_model_parallel": True, "partition_dim": 0, "partition_stride": 1, "num_partitions": None})],
)  # fmt: skip
def test_parameters_declared_equals_derived(tp, shape, entry):
    entry = dict(entry, num_partitions=tp) if entry["tensor_model_parallel"] else entry
    full = torch.zeros(shape)
    if entry["tensor_model_parallel"]:
        ranks = [create_local_weight_with_padding(full, entry["partition_dim"], entry["partition_stride"], tp, r) for r in range(tp)]
    else:
        ranks = [full] * tp
    _check_group(None, {"lm_head.weight": ranks}, {"lm_head.weight": entry})


def test_every_registered_spec_has_a_declared_layout():
    assert set(DECLARED_SPECS) == set(SPEC_REGISTRY)


@pytest.mark.parametrize(
    "edit",
    [
        lambda f: f.update(extra=1),  # a field the spec does not have
        lambda f: f.pop("tp_size"),
        lambda f: f.update(kv_output_size_per_partition=f["kv_output_size_per_partition"] + 1),
        lambda f: f.update(num_key_value_heads=3),
        lambda f: f.update(fuse_qkv=1),  # truthy, but not what the spec writes
        lambda f: f.update(peft_type="ia3"),
        lambda f: f.update(kv_layout="striped"),
    ],
)
def test_fields_the_spec_refuses_are_unsupported(edit):
    fields = GQAQKVColumnParallelLinearSpec.create(num_attention_heads=8, num_key_value_heads=2, head_dim=4, tp_size=4).to_dict()
    edit(fields)
    with pytest.raises(Unsupported):
        declared_spec("GQAQKVColumnParallelLinearSpec", fields)
    with pytest.raises(Unsupported):
        declared_spec("os.system", {})


def test_shapes_that_disagree_with_the_spec_are_unsupported():
    spec = GQAQKVColumnParallelLinearSpec.create(num_attention_heads=8, num_key_value_heads=2, head_dim=4, tp_size=2)
    declared = declared_spec(type(spec).__name__, spec.to_dict())
    names = [f"{MODULE}.qkv_proj.weight_q", f"{MODULE}.qkv_proj.weight_k", f"{MODULE}.qkv_proj.weight_v"]
    good = {names[0]: (16, 12), names[1]: (4, 12), names[2]: (4, 12)}
    assert len(declared.outputs(MODULE, GroupShapes(names, good, 2))[0]) == 3
    for bad in ({**good, names[1]: (5, 12)}, {**good, names[0]: (16, 0)}, {**good, names[2]: ()}):
        with pytest.raises(Unsupported):
            declared.outputs(MODULE, GroupShapes(names, bad, 2))
    with pytest.raises(Unsupported):  # 1-D tensor sharded along dim 1
        parameter_output("w", GroupShapes(["w"], {"w": (8,)}, 2), {"tensor_model_parallel": True, "partition_dim": 1, "partition_stride": 1, "num_partitions": 2})
    with pytest.raises(Unsupported):  # num_partitions disagrees with the ranks
        parameter_output("w", GroupShapes(["w"], {"w": (8,)}, 2), {"tensor_model_parallel": True, "partition_dim": 0, "partition_stride": 1, "num_partitions": 4})
