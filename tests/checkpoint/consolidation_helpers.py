"""Tiny Llama models and adapters, sharded into our format and optimum-neuron's, for the consolidation tests."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import time
from pathlib import Path

import torch
import transformers

from optimum_neuron_peft.checkpoint.engine_common import SLEEP_ENV
from optimum_neuron_writer import write_optimum_neuron_checkpoint
from optimum_neuron_peft.checkpoint.save import AdapterShards, save_sharded_checkpoint
from optimum_neuron_peft.checkpoint.tp_layout import (
    LORA_TARGETS,
    plan_layout,
    merge_adapter_metadata,
    optimum_neuron_lora_metadata,
    peft_state_dict_to_plain,
    to_optimum_neuron_lora,
)

CONFIG = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
)  # fmt: skip


def llama_config(**overrides) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(**{**CONFIG, **overrides})


@functools.lru_cache(maxsize=4)
def _model_state(dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(llama_config()).to(dtype)
    # LlamaRMSNorm weights start at 1: randomize so that a wrong mapping cannot pass unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p, dtype=torch.float32).to(dtype))
    return {k: v.clone() for k, v in model.state_dict().items()}


def model_state(dtype=torch.float32, seed=0) -> dict[str, torch.Tensor]:
    return dict(_model_state(dtype, seed))


def adapter_state(seed=1, shared_lora_a=False, targets=LORA_TARGETS, r=4) -> tuple[dict[str, torch.Tensor], dict]:
    """PEFT adapter tensors (keys ``base_model.model....lora_A.weight``) and its adapter_config dict."""
    import peft

    torch.manual_seed(seed)
    base = transformers.LlamaForCausalLM(llama_config())
    config = peft.LoraConfig(target_modules=list(targets), r=r, lora_alpha=8, init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    state = peft.get_peft_model_state_dict(model)
    if shared_lora_a:  # optimum-neuron shares one lora_A between q/k/v and between gate/up
        for i in range(CONFIG["num_hidden_layers"]):
            p = f"base_model.model.model.layers.{i}."
            for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
                first = state[f"{p}{group[0]}.lora_A.weight"]
                for other in group[1:]:
                    state[f"{p}{other}.lora_A.weight"] = first.clone()
    config_dict = config.to_dict()
    config_dict["target_modules"] = sorted(targets)
    config_dict["peft_type"] = "LORA"
    config_dict["task_type"] = None
    return {k: v.clone() for k, v in state.items()}, config_dict


def write_ours(root: Path, tp: int, pp: int = 1, *, model: dict | None = None, adapters: dict | None = None, fuse_qkv=False, **config_overrides) -> Path:
    """Our format: ``model`` original state dict, ``adapters`` {name: (peft state dict, adapter_config)}."""
    config = llama_config(**config_overrides)
    layout = plan_layout(config, tp, pp_size=pp, fuse_qkv=fuse_qkv, lora_target_modules=LORA_TARGETS)
    base_layout = plan_layout(config, tp, pp_size=pp, fuse_qkv=fuse_qkv)
    shards = {}
    for name, (state, cfg) in (adapters or {}).items():
        shards[name] = AdapterShards(
            layout.rank_state_dicts(peft_state_dict_to_plain(state)), layout.metadata_per_pp(name), cfg
        )
    save_sharded_checkpoint(
        root,
        base_layout.rank_state_dicts(model) if model is not None else None,
        base_layout.metadata_per_pp() if model is not None else None,
        config=config.to_dict(),
        adapters=shards,
    )
    return root


def write_optimum_neuron(root: Path, tp: int, pp: int = 1, *, serialization="plain", model=None, adapter=None, adapter_name="default", fuse_qkv=False, metadata_format="json", **config_overrides) -> Path:
    """optimum-neuron's layout; an adapter is written with its shared lora_A / fused gate_up lora_B naming."""
    config = llama_config(**config_overrides)
    if model is not None:
        layout = plan_layout(config, tp, pp_size=pp, fuse_qkv=fuse_qkv)
        metadata = layout.metadata_per_pp()
        if fuse_qkv:  # the quirk: a fused weight_qkv is recorded as not tensor-parallel
            for meta in metadata.values():
                for name in meta["parameters"]:
                    if name.endswith("weight_qkv"):
                        meta["parameters"][name] = {"tensor_model_parallel": False}
        write_optimum_neuron_checkpoint(
            root, layout.rank_state_dicts(model), metadata, serialization=serialization,
            config=config.to_dict(), metadata_format=metadata_format,
        )
    if adapter is not None:
        write_optimum_neuron_adapters(root, llama_config(), tp, {adapter_name: adapter}, pp=pp, serialization=serialization)
    return root


def write_optimum_neuron_adapters(
    root: Path, config, tp: int, adapters: dict, *, pp: int = 1, serialization="plain", kv_size_multiplier=None,
    fuse_qkv=False, mha_fused_qkv=False, write_config=True,
) -> Path:
    """Every adapter of ``adapters`` ({name: (PEFT state dict with shared lora_A, adapter_config)}) as optimum-neuron's
    ``NeuronPeftModel.save_pretrained`` writes them: one ``adapter_<name>/`` each, rank files holding that adapter's
    tensors, and every adapter's metadata listing the parameters of all adapters (pinned against the reference sample
    by test_optimum_neuron_sample.py)."""
    targets = sorted({t for _, cfg in adapters.values() for t in cfg["target_modules"]})
    layout = plan_layout(
        config, tp, pp_size=pp, kv_size_multiplier=kv_size_multiplier, fuse_qkv=fuse_qkv, mha_fused_qkv=mha_fused_qkv,
        lora_target_modules=targets,
    )
    metadata = {
        stage: merge_adapter_metadata(
            optimum_neuron_lora_metadata(layout.metadata(stage, name), name, fuse_qkv=fuse_qkv) for name in adapters
        )
        for stage in range(pp)
    }
    for name, (state, cfg) in adapters.items():
        ranks = (
            (key, to_optimum_neuron_lora(local, fuse_qkv=fuse_qkv))
            for key, local in layout.rank_state_dicts(peft_state_dict_to_plain(state))
        )
        write_optimum_neuron_checkpoint(
            root, ranks, metadata, serialization=serialization, adapter_name=name, adapter_config=cfg,
            config=config.to_dict() if write_config else None,
        )
    return root


def assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    assert actual.dtype == expected.dtype and tuple(actual.shape) == tuple(expected.shape), name
    a = actual.contiguous().view(-1).view(torch.uint8)
    b = expected.contiguous().view(-1).view(torch.uint8)
    assert torch.equal(a, b), f"{name}: bytes differ"


def assert_model_loads_equal(directory: Path, expected: dict[str, torch.Tensor]) -> None:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True, dtype="auto")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    state = model.state_dict()
    assert sorted(state) == sorted(expected)
    for name, tensor in expected.items():
        assert_bit_equal(state[name], tensor, name)


def assert_adapter_loads_equal(directory: Path, expected: dict[str, torch.Tensor]) -> None:
    import peft
    from safetensors.torch import load_file

    saved = load_file(directory / "adapter_model.safetensors")
    assert sorted(saved) == sorted(expected)
    for name, tensor in expected.items():
        assert_bit_equal(saved[name], tensor, name)
    base = transformers.LlamaForCausalLM(llama_config())
    model = peft.PeftModel.from_pretrained(base, directory)
    loaded = peft.get_peft_model_state_dict(model)
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():  # PEFT loads into the base model's dtype (exact for bf16 -> fp32)
        assert_bit_equal(loaded[name], tensor.to(loaded[name].dtype), name)


def kill_mid_write_then_rerun(cmd: list[str], out: Path, cwd: Path | None = None) -> None:
    """Run the consolidate ``cmd`` slowed down (`SLEEP_ENV`), SIGKILL it once its temporary output directory beside
    ``out`` holds a safetensors file, check nothing is left at ``out``, then run it again to completion."""
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, SLEEP_ENV: "0.2"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    parent, deadline = out.parent, time.monotonic() + 60
    while time.monotonic() < deadline and not any(p.name.startswith(f".{out.name}.tmp-") and any(p.rglob("*.safetensors")) for p in parent.iterdir()):
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
