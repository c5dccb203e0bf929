"""Every adapter layout optimum-neuron writes consolidates to the vanilla PEFT adapter it was sharded from.

Checkpoints come from the project's writer, which test_optimum_neuron_sample.py pins against files optimum-neuron
wrote itself. The reference is a vanilla PEFT adapter on the Transformers model (Llama, Qwen3, Granite), with
optimum-neuron's constraint that q/k/v (and gate/up) share one lora_A. Each case checks: the consolidated tensors
equal the reference bit for bit, ``adapter_config.json`` names the original targets, ``PeftModel.from_pretrained``
loads it with no missing or unexpected key, and ``verify`` passes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from consolidation_helpers import assert_bit_equal, write_optimum_neuron_adapters
from optimum_neuron_peft.checkpoint import consolidate, reshard, verify
from optimum_neuron_peft.checkpoint.tp_layout import LORA_TARGETS

CONFIGS = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config, "granite": transformers.GraniteConfig}


@dataclass(frozen=True)
class Case:
    tp: int
    heads: int = 8
    kv_heads: int = 2
    m: int | None = None  # kv_size_multiplier; None: the smallest valid one
    family: str = "llama"
    pp: int = 1
    fuse_qkv: bool = False
    mha_fused_qkv: bool = False
    serialization: str = "plain"
    adapters: tuple[str, ...] = ("default",)
    targets: tuple[str, ...] = LORA_TARGETS
    extra: dict = field(default_factory=dict, hash=False)

    def __str__(self) -> str:
        flags = [self.family, f"tp{self.tp}", f"H{self.heads}K{self.kv_heads}", f"m{self.m}", f"pp{self.pp}", self.serialization]
        flags += ["fuse_qkv"] * self.fuse_qkv + ["mha_fused"] * self.mha_fused_qkv + [f"{len(self.adapters)}adapters"]
        return "-".join(flags)


CASES = [
    Case(tp=2, kv_heads=2),  # the GQA layer at m=1: as many kv heads as ranks
    Case(tp=4, m=2, serialization="xser"),
    Case(tp=4, m=4, adapters=("default", "other")),
    Case(tp=8, m=4, pp=2),
    Case(tp=8, kv_heads=1, m=8, serialization="xser"),
    Case(tp=4, kv_heads=4, m=1, targets=("q_proj", "v_proj", "down_proj")),
    Case(tp=8, m=4, kv_heads=2, fuse_qkv=True),
    Case(tp=2, m=1, kv_heads=2, fuse_qkv=True, pp=2, serialization="xser"),
    Case(tp=32, heads=32, kv_heads=4, m=8),
    Case(tp=2, heads=4, kv_heads=4, mha_fused_qkv=True),
    Case(tp=4, heads=4, kv_heads=4, mha_fused_qkv=True, adapters=("a", "b"), serialization="xser"),
    Case(tp=4, m=2, family="qwen3", extra={"head_dim": 16}),
    Case(tp=8, m=4, family="granite", pp=2, extra={"residual_multiplier": 0.5, "embedding_multiplier": 2.0}),
]


def model_config(case: Case) -> transformers.PretrainedConfig:
    fields = dict(
        vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=case.heads,
        num_key_value_heads=case.kv_heads, max_position_embeddings=32, tie_word_embeddings=False,
    )
    return CONFIGS[case.family](**fields, **case.extra)


def reference_adapter(config, targets, seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """A vanilla PEFT adapter (random A and B) where q/k/v and gate/up share lora_A, as optimum-neuron trains them."""
    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_config(config)
    lora = peft.LoraConfig(target_modules=list(targets), r=4, lora_alpha=8, init_lora_weights=False)
    state = peft.get_peft_model_state_dict(peft.get_peft_model(base, lora))
    for key in list(state):
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            present = [p for p in group if p in targets]
            for proj in present[1:]:
                if f".{proj}.lora_A." in key:
                    state[key] = state[key.replace(f".{proj}.", f".{present[0]}.")].clone()
    config_dict = lora.to_dict()
    config_dict.update(target_modules=sorted(targets), peft_type="LORA", task_type="CAUSAL_LM")
    return {k: v.detach().clone() for k, v in state.items()}, config_dict


@pytest.mark.parametrize("case", CASES, ids=str)
def test_adapter_layout_consolidates_to_the_vanilla_adapter(tmp_path, case):
    config = model_config(case)
    adapters = {name: reference_adapter(config, case.targets, seed) for seed, name in enumerate(case.adapters)}
    checkpoint = write_optimum_neuron_adapters(
        tmp_path / "ckpt", config, case.tp, adapters, pp=case.pp, serialization=case.serialization,
        kv_size_multiplier=case.m, fuse_qkv=case.fuse_qkv, mha_fused_qkv=case.mha_fused_qkv,
    )
    out = tmp_path / "out"
    result = consolidate(checkpoint, out)
    assert set(result.directories) == set(case.adapters)
    verify(checkpoint, out)
    for name, (state, lora_config) in adapters.items():
        directory = out if len(adapters) == 1 else out / name
        got = load_file(directory / "adapter_model.safetensors")
        assert sorted(got) == sorted(state)  # exactly one base_model.model. prefix, one pair per projection
        for key in state:
            assert_bit_equal(got[key], state[key], key)
        assert json.loads((directory / "adapter_config.json").read_text())["target_modules"] == sorted(case.targets)
        # Loaded values equal to the file prove every key was found (PEFT would leave B at its zero init otherwise).
        model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_config(config), directory)
        loaded = peft.get_peft_model_state_dict(model)
        assert sorted(loaded) == sorted(state)
        for key in state:
            assert_bit_equal(loaded[key], state[key], key)


def test_reshard_of_an_optimum_neuron_adapter_keeps_every_tensor(tmp_path):
    case = Case(tp=8, m=4, pp=2, adapters=("default", "other"))
    config = model_config(case)
    adapters = {name: reference_adapter(config, case.targets, seed) for seed, name in enumerate(case.adapters)}
    checkpoint = write_optimum_neuron_adapters(tmp_path / "ckpt", config, 8, adapters, pp=2, kv_size_multiplier=4)
    reshard(checkpoint, tmp_path / "tp2", tp_size=2)
    consolidate(tmp_path / "tp2", tmp_path / "out")
    for name, (state, _) in adapters.items():
        got = load_file(tmp_path / "out" / name / "adapter_model.safetensors")
        assert sorted(got) == sorted(state)
        for key in state:
            assert_bit_equal(got[key], state[key], key)
