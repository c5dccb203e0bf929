"""Spec-level LoRA config rewriting: original module names <-> fused module names, partial targets included."""

import pytest
from peft import LoraConfig, PromptTuningConfig

from optimum_neuron_peft import FusedLinearsSpec, GQAQKVColumnParallelLinearSpec
from optimum_neuron_peft.errors import ConfigError

GQA = GQAQKVColumnParallelLinearSpec.create(num_attention_heads=8, num_key_value_heads=2, head_dim=4, tp_size=2)
MLP = FusedLinearsSpec("gate_up_proj", ["gate_proj", "up_proj"], False, 0, [8, 8], tp_size=2)


@pytest.mark.parametrize(
    "targets,expected",
    [
        ({"q_proj", "k_proj", "v_proj", "o_proj"}, {"qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj"}),
        ({"q_proj", "v_proj"}, {"qkv_proj", "q_proj", "v_proj"}),
        ({"gate_proj", "down_proj"}, {"gate_up_proj", "gate_proj", "down_proj"}),
        ({"o_proj", "down_proj"}, {"o_proj", "down_proj"}),
    ],
)
def test_adapt_and_restore(targets, expected):
    config = LoraConfig(target_modules=sorted(targets), r=4)
    adapted = MLP.adapt_peft_config(GQA.adapt_peft_config(config))
    assert set(adapted.target_modules) == expected
    assert set(config.target_modules) == targets  # not modified in place
    restored = GQA.to_original_peft_config(MLP.to_original_peft_config(adapted))
    assert set(restored.target_modules) == targets


def test_inplace_modifies_the_given_config():
    config = LoraConfig(target_modules=["q_proj", "k_proj", "v_proj"], r=4)
    assert GQA.adapt_peft_config(config, inplace=True) is config
    assert "qkv_proj" in config.target_modules


def test_optimum_neuron_adapted_config_restores_every_projection():
    # optimum-neuron removes the originals and keeps only the fused name
    config = LoraConfig(target_modules=["qkv_proj", "gate_up_proj"], r=4)
    restored = MLP.to_original_peft_config(GQA.to_original_peft_config(config))
    assert set(restored.target_modules) == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}


def test_unsupported_peft_type():
    with pytest.raises(ConfigError, match="PEFT type 'PROMPT_TUNING' is not supported; supported PEFT types: LORA"):
        GQA.adapt_peft_config(PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
