"""Metadata in the docs/checkpoint_formats.md section 3 schema: fixture -> specs -> JSON is lossless, and a real consolidation."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from optimum_neuron_peft import (
    CustomModule,
    FusedLinearsSpec,
    GQAQKVColumnParallelLinearSpec,
    ModelWeightTransformationSpecs,
    adapt_state_dict,
    create_parameter_metadata,
    get_tensor_model_parallel_attributes,
    specialize_transformation_specs_for_model,
    to_original_weights,
)
from optimum_neuron_peft.errors import SpecError
from optimum_neuron_peft.transformations import metadata_from_json, metadata_to_json, parse_metadata
from optimum_neuron_peft.transformations.sharding import shard_tensor

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "mp_metadata_pp_rank_0.json"


def test_fixture_deserializes_into_specs_and_serializes_back_identically():
    data = json.loads(FIXTURE.read_text())
    parameters, specs = parse_metadata(data, where=str(FIXTURE))
    attn, mlp = specs
    (gqa,) = attn.specs
    (fused,) = mlp.specs
    assert isinstance(gqa, GQAQKVColumnParallelLinearSpec) and gqa.head_dim == 8 and gqa.peft_type is None
    assert isinstance(fused, FusedLinearsSpec) and fused.fuse_axis == 0 and fused.peft_type == "lora"
    assert [s.to_metadata() for s in specs] == data["model_weight_transformation_specs"]
    rebuilt = {"parameters": parameters, "model_weight_transformation_specs": [s.to_metadata() for s in specs]}
    assert json.loads(metadata_to_json(rebuilt)) == data


def test_string_fuse_axis_is_normalized_and_interleaved_layout_serialized_only_when_used():
    spec = FusedLinearsSpec("gate_up_proj", ["gate_proj", "up_proj"], False, "row", [8, 8], tp_size=2)
    assert spec.to_dict()["fuse_axis"] == 1
    tiled = GQAQKVColumnParallelLinearSpec.create(num_attention_heads=8, num_key_value_heads=2, head_dim=4, tp_size=4)
    assert "kv_layout" not in tiled.to_dict()  # optimum-neuron's schema has no such field
    inter = GQAQKVColumnParallelLinearSpec.create(num_attention_heads=8, num_key_value_heads=2, head_dim=4, tp_size=4, kv_layout="interleaved")
    back = GQAQKVColumnParallelLinearSpec.from_dict(inter.to_dict())
    assert back == inter


def test_unknown_spec_names_and_fields_are_rejected():
    data = json.loads(FIXTURE.read_text())
    data["model_weight_transformation_specs"][0]["specs"][0][0] = "os.system"
    with pytest.raises(SpecError, match=r"unknown weight transformation spec 'os.system'; known specs: \['FusedLinearsSpec', 'GQAQKVColumnParallelLinearSpec'"):
        parse_metadata(data, where="ckpt/mp_metadata_pp_rank_0.json")
    data = json.loads(FIXTURE.read_text())
    data["model_weight_transformation_specs"][1]["specs"][0][1]["surprise"] = 1
    with pytest.raises(SpecError, match=r"FusedLinearsSpec got unknown fields \['surprise'\]"):
        parse_metadata(data)
    data = json.loads(FIXTURE.read_text())
    del data["parameters"]["model.layers.0.mlp.down_proj.weight"]["partition_dim"]
    with pytest.raises(SpecError, match=r"sharded parameter 'model.layers.0.mlp.down_proj.weight' is missing \['partition_dim'\]"):
        parse_metadata(data)
    with pytest.raises(SpecError, match="not valid JSON"):
        metadata_from_json("{oops", where="x.json")


# -- a tiny custom "model" with tensor-parallel attributes, exercising the model-level functions ------------------


def tp_param(shape, dim, stride, tp):
    p = nn.Parameter(torch.zeros(shape))
    if dim is None:
        p.tensor_model_parallel = False
    else:
        p.tensor_model_parallel, p.partition_dim, p.partition_stride, p.num_partitions = True, dim, stride, tp
    return p


class Attn(nn.Module, CustomModule):
    def __init__(self, tp):
        super().__init__()
        self.qkv_proj = nn.Module()
        for s, rows in (("q", 16), ("k", 8), ("v", 8)):
            self.qkv_proj.register_parameter(f"weight_{s}", tp_param((rows, 32), 0, 1, tp))
        self.o_proj = nn.Module()
        self.o_proj.weight = tp_param((32, 16), 1, 1, tp)
        self.specs = ModelWeightTransformationSpecs(
            specs=GQAQKVColumnParallelLinearSpec.create(num_attention_heads=8, num_key_value_heads=2, head_dim=8, tp_size=tp)
        )


class Mlp(nn.Module, CustomModule):
    def __init__(self, tp):
        super().__init__()
        self.gate_up_proj = nn.Module()
        self.gate_up_proj.weight = tp_param((2 * 16 // tp, 32), 0, 2, tp)
        self.down_proj = nn.Module()
        self.down_proj.weight = tp_param((32, 16 // tp), 1, 1, tp)
        self.specs = ModelWeightTransformationSpecs(specs=FusedLinearsSpec("gate_up_proj", ["gate_proj", "up_proj"], False, 0, [16, 16], tp_size=tp))


class Tiny(nn.Module):
    def __init__(self, tp=4):
        super().__init__()
        self.embed_tokens = nn.Module()
        self.embed_tokens.weight = tp_param((40 // tp, 32), 0, 1, tp)
        self.self_attn = Attn(tp)
        self.mlp = Mlp(tp)
        self.norm = nn.Module()
        self.norm.weight = tp_param((32,), None, 1, tp)


def original_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "embed_tokens.weight": (40, 32), "self_attn.q_proj.weight": (64, 32), "self_attn.k_proj.weight": (16, 32),
        "self_attn.v_proj.weight": (16, 32), "self_attn.o_proj.weight": (32, 64), "mlp.gate_proj.weight": (16, 32),
        "mlp.up_proj.weight": (16, 32), "mlp.down_proj.weight": (32, 16), "norm.weight": (32,),
    }
    return {n: torch.randn(*s, generator=g) for n, s in shapes.items()}


def test_model_level_round_trip_through_metadata_json():
    model = Tiny(tp=4)
    specialize_transformation_specs_for_model(model)
    metadata = json.loads(metadata_to_json(create_parameter_metadata(model)))
    assert metadata["parameters"]["mlp.gate_up_proj.weight"] == {"tensor_model_parallel": True, "partition_dim": 0, "partition_stride": 2, "num_partitions": 4}
    assert metadata["parameters"]["norm.weight"] == {"tensor_model_parallel": False}
    assert get_tensor_model_parallel_attributes(model.mlp.down_proj.weight)["partition_dim"] == 1
    original = original_weights()
    per_rank = [adapt_state_dict(model, original, rank) for rank in range(4)]
    assert set(per_rank[0]) == {n for n, _ in model.named_parameters()}
    for name, param in model.named_parameters():
        assert per_rank[0][name].shape == param.shape, name
    torch.testing.assert_close(per_rank[3]["embed_tokens.weight"], shard_tensor(original["embed_tokens.weight"], 0, 4, 3), rtol=0, atol=0)
    # consolidate from the JSON metadata alone, as the consolidation CLI does
    parameters, specs = parse_metadata(metadata)
    sharded = {name: [local[name] for local in per_rank] for name in per_rank[0]}
    rebuilt = to_original_weights(specs, sharded, parameters)
    assert sorted(rebuilt) == sorted(original)
    for name in original:
        torch.testing.assert_close(rebuilt[name], original[name], rtol=0, atol=0)


def test_model_level_errors_name_the_tensor():
    model = Tiny(tp=2)
    specialize_transformation_specs_for_model(model)
    original = original_weights()
    with pytest.raises(SpecError, match=r"1 tensors match no parameter of the model, e.g. \['lm_head.weight'\]"):
        adapt_state_dict(model, dict(original, **{"lm_head.weight": torch.zeros(1)}), 0)
    metadata = create_parameter_metadata(model)
    parameters, specs = parse_metadata(metadata)
    per_rank = [adapt_state_dict(model, original, rank) for rank in range(2)]
    sharded = {name: [local[name] for local in per_rank] for name in per_rank[0]}
    sharded["extra.weight"] = [torch.zeros(1)] * 2
    with pytest.raises(SpecError, match="extra.weight: saved tensor has no entry in the parameters metadata"):
        to_original_weights(specs, sharded, parameters)
    del sharded["extra.weight"]
    sharded["embed_tokens.weight"] = sharded["embed_tokens.weight"][:1]
    with pytest.raises(SpecError, match="embed_tokens.weight: metadata says num_partitions=2, found tensors from 1 ranks"):
        to_original_weights(specs, sharded, parameters)


def test_pipeline_stage_metadata_lists_only_that_stage():
    model = Tiny(tp=2)
    specialize_transformation_specs_for_model(model)
    stage = {"mlp.gate_up_proj.weight", "mlp.down_proj.weight", "norm.weight"}
    metadata = create_parameter_metadata(model, parameters_for_current_stage=stage)
    assert set(metadata["parameters"]) == stage
    assert [e["module_fully_qualified_name"] for e in metadata["model_weight_transformation_specs"]] == ["mlp"]
