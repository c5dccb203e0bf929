"""The parallel plan's table against real models: Transformers' state dicts, our models' metadata and LoRA layers."""

from __future__ import annotations

import subprocess
import sys

import peft
import pytest
import torch
import transformers

from optimum_neuron_peft.errors import ConfigError
from optimum_neuron_peft.models import AutoModelForCausalLM, ParallelPlan
from optimum_neuron_peft.parallel import TensorParallel
from optimum_neuron_peft.peft import get_peft_model
from optimum_neuron_peft.transformations import create_parameter_metadata
from optimum_neuron_peft.transformations.names import remove_adapter_name, split_lora_name
from optimum_neuron_peft.transformations.parallel_plan import (
    FAMILIES,
    LORA_PARTITION_DIM,
    LORA_TARGETS,
    family_of,
    lora_entries,
    original_shapes,
    parameter_entries,
)

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
CASES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(attention_bias=True, mlp_bias=True)),
    "llama_tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=True)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=4)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=16, attention_bias=True)),
    "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM, dict(mlp_bias=True, num_key_value_heads=4)),
}  # fmt: skip


def _config(case: str):
    config_cls, _, extra = CASES[case]
    return config_cls(**{**COMMON, **extra})


@pytest.mark.parametrize("case", list(CASES))
def test_original_shapes_are_transformers_state_dict(case):
    config = _config(case)
    with torch.device("meta"):
        model = CASES[case][1](config)
    theirs = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        del theirs["lm_head.weight"]  # the same tensor as the embedding: not saved
    assert original_shapes(config) == theirs
    assert original_shapes(config.to_dict()) == theirs


@pytest.mark.parametrize("fuse_qkv", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_parameter_entries_are_our_models_metadata(case, fuse_qkv):
    config = _config(case)
    model = AutoModelForCausalLM.from_config(config, ParallelPlan(TensorParallel.single(), fuse_qkv=fuse_qkv))
    metadata = model.parameters_metadata()["parameters"]
    assert parameter_entries(config, 1, fuse_qkv=fuse_qkv) == metadata


@pytest.mark.parametrize("case", ["llama", "qwen3"])
def test_lora_entries_are_our_lora_layers_metadata(case):
    """The LoRA rule as our LoRA layers apply it (`tensor_model_parallel` attributes of every LoRA parameter)."""
    config = _config(case)
    model = AutoModelForCausalLM.from_config(config, ParallelPlan(TensorParallel.single()))
    peft_model = get_peft_model(model, peft.LoraConfig(r=2, target_modules=list(LORA_TARGETS)))
    metadata = create_parameter_metadata(peft_model)["parameters"]
    names = {n: remove_adapter_name(n).removeprefix("base_model.model.") for n in metadata}
    lora = {names[n]: e for n, e in metadata.items() if split_lora_name(names[n])}
    assert lora == lora_entries(config, 1, LORA_TARGETS)


def test_lora_rule():
    # column-parallel base: lora_B sharded like its output rows; row-parallel: lora_A like its input columns.
    assert LORA_PARTITION_DIM["column"] == ("lora_B", 0) and LORA_PARTITION_DIM["row"] == ("lora_A", 1)
    entries = lora_entries(_config("llama"), 4, ["q_proj", "down_proj"])
    assert entries["model.layers.0.self_attn.qkv_proj.lora_A.weight_q"] == {"tensor_model_parallel": False}
    assert entries["model.layers.0.self_attn.qkv_proj.lora_B.weight_q"]["partition_dim"] == 0
    assert entries["model.layers.0.mlp.down_proj.lora_A.weight"]["partition_dim"] == 1
    assert entries["model.layers.0.mlp.down_proj.lora_B.weight"] == {"tensor_model_parallel": False}
    with pytest.raises(ConfigError, match=r"\['lm_head'\] are not linears"):
        lora_entries(_config("llama"), 2, ["lm_head"])


def test_families():
    assert sorted(FAMILIES) == ["granite", "llama", "mistral", "qwen3"]
    assert family_of(_config("qwen3")).qk_norm and family_of({"model_type": "granite"}).granite
    with pytest.raises(ConfigError, match=r"unsupported model_type 'gpt2'"):
        family_of({"model_type": "gpt2"})


def test_plan_is_torch_free():
    code = "import sys, optimum_neuron_peft.transformations.parallel_plan; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
