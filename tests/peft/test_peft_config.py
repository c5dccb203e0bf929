"""Model-level LoRA config adaptation (original names <-> custom model) and the config-time errors."""

from __future__ import annotations

import peft
import pytest
import transformers
from peft import LoraConfig, PromptTuningConfig

from optimum_neuron_peft.errors import ConfigError
from optimum_neuron_peft.models import AutoModelForCausalLM
from optimum_neuron_peft.peft import (
    ALL_LINEAR,
    FUSED_REGEX_MARKER,
    LoraFusedColumnParallelLinear,
    LoraGQAQKVColumnParallelLinear,
    adapt_peft_config_for_model,
    get_peft_model,
    to_original_peft_config_for_model,
)


@pytest.fixture(scope="module")
def model():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2)  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


ROUND_TRIPS = {
    "list_full": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "partial_qv": dict(target_modules=["q_proj", "v_proj"]),
    "attention_only": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mlp_only": dict(target_modules=["gate_proj", "up_proj", "down_proj"]),
    "full_names": dict(target_modules=["model.layers.1.self_attn.k_proj", "model.layers.0.mlp.up_proj"]),
    "all_linear": dict(target_modules="all-linear"),
    "regex": dict(target_modules=r".*\.(q_proj|down_proj)"),
    "regex_no_fused": dict(target_modules=r".*\.(o_proj|down_proj)"),
    "patterns": dict(target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 32}),
    "layers": dict(target_modules=["q_proj", "gate_proj"], layers_to_transform=[0], layers_pattern="layers"),
    "embed_head": dict(target_modules=["embed_tokens", "lm_head", "up_proj"], modules_to_save=["norm"]),
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_round_trip(model, name):
    config = LoraConfig(r=4, **ROUND_TRIPS[name])
    adapted = adapt_peft_config_for_model(model, config)
    assert adapted is not config and adapted._custom_modules
    restored = to_original_peft_config_for_model(model, adapted)
    assert restored.to_dict() == config.to_dict()
    assert restored._custom_modules is None


def test_dict_of_configs_round_trip(model):
    configs = {"a": LoraConfig(target_modules=["q_proj"]), "b": LoraConfig(target_modules="all-linear")}
    adapted = adapt_peft_config_for_model(model, configs)
    assert "qkv_proj" in adapted["a"].target_modules and ALL_LINEAR in adapted["b"].target_modules
    restored = to_original_peft_config_for_model(model, adapted)
    assert {k: v.to_dict() for k, v in restored.items()} == {k: v.to_dict() for k, v in configs.items()}


def test_adapted_forms(model):
    qv = adapt_peft_config_for_model(model, LoraConfig(target_modules=["q_proj", "v_proj"]))
    assert set(qv.target_modules) == {"q_proj", "v_proj", "qkv_proj"}
    full = adapt_peft_config_for_model(model, LoraConfig(target_modules=["model.layers.1.self_attn.k_proj"]))
    assert set(full.target_modules) == {"model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.qkv_proj"}
    regex = adapt_peft_config_for_model(model, LoraConfig(target_modules=r".*\.q_proj"))
    assert regex.target_modules.startswith(r"(?:.*\.q_proj)|" + FUSED_REGEX_MARKER)
    linear = adapt_peft_config_for_model(model, LoraConfig(target_modules="all-linear"))
    assert set(linear.target_modules) == {ALL_LINEAR, "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj", "qkv_proj", "gate_up_proj"}  # no lm_head  # fmt: skip


@pytest.mark.parametrize(
    "kwargs,projections",
    [
        (dict(target_modules=["q_proj", "v_proj"]), {"qkv_proj": ["weight_q", "weight_v"], "gate_up_proj": None}),
        (dict(target_modules=["up_proj"]), {"qkv_proj": None, "gate_up_proj": ["weight_up_proj"]}),
        (dict(target_modules="all-linear", exclude_modules=["k_proj"]),
         {"qkv_proj": ["weight_q", "weight_v"], "gate_up_proj": ["weight_gate_proj", "weight_up_proj"]}),
        (dict(target_modules=r"model\.layers\.1\.self_attn\.k_proj"), {"qkv_proj": None, "gate_up_proj": None}),
    ],
)
def test_partial_targets_place_only_those_projections(kwargs, projections):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2)  # fmt: skip
    pm = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=4, **kwargs))
    layer = pm.base_model.model.model.layers[0]
    for name, expected in projections.items():
        module = getattr(layer.self_attn if name == "qkv_proj" else layer.mlp, name)
        if expected is None:
            assert not isinstance(module, (LoraGQAQKVColumnParallelLinear, LoraFusedColumnParallelLinear))
        else:
            assert sorted(module.lora_A["default"]._parameters) == expected
            assert sorted(module.lora_B["default"]._parameters) == expected


def test_per_projection_rank_and_scaling_follow_the_original_names():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2)  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True,
                      rank_pattern={"v_proj": 2}, alpha_pattern={"model.layers.1.self_attn.q_proj": 3})  # fmt: skip
    pm = get_peft_model(AutoModelForCausalLM.from_config(config), lora)
    layers = pm.base_model.model.model.layers
    assert layers[0].self_attn.qkv_proj.projection_r["default"] == {"q": 4, "v": 2}
    assert layers[0].self_attn.qkv_proj.projection_scaling["default"] == pytest.approx({"q": 8 / 2, "v": 8 / 2**0.5})
    assert layers[1].self_attn.qkv_proj.projection_scaling["default"] == pytest.approx({"q": 3 / 2, "v": 8 / 2**0.5})
    assert tuple(layers[0].self_attn.qkv_proj.lora_B["default"].weight_v.shape) == (8, 2)


@pytest.mark.parametrize(
    "config,message",
    [
        (LoraConfig(target_modules=["q_porj"]), r"match no module of the model.*'q_proj'"),
        (LoraConfig(target_modules=["q_proj"], layers_to_transform=[5]), "match no module of the model"),
        (LoraConfig(target_modules=r".*\.nothing"), "match no module"),
        (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "supported PEFT types: LORA"),
        (peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]), "PEFT type 'IA3' is not supported"),
        (LoraConfig(target_modules=["q_proj"], use_dora=True), "DoRA"),
        (LoraConfig(target_modules=["q_proj"], lora_bias=True), "lora_bias"),
        (LoraConfig(target_modules=["q_proj"], init_lora_weights="pissa"), "supported: True, False, 'gaussian'"),
        (LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]), "sharded"),
        (LoraConfig(target_modules=["o_proj"], modules_to_save=["q_proj"]), "fused"),
        (LoraConfig(target_modules=None), "target_modules is not set"),
        (LoraConfig(target_modules=["qkv_proj", "k_proj", "o_proj"], exclude_modules=["k_proj"]), "none of its projections"),
    ],
)
def test_bad_configs_fail_at_config_time(model, config, message):
    with pytest.raises(ConfigError, match=message):
        adapt_peft_config_for_model(model, config)
    with pytest.raises(ConfigError, match=message):
        get_peft_model(model, config)
