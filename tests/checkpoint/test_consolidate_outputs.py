"""Consolidation of our format and optimum-neuron's into Transformers / PEFT directories, checked against the
Transformers and PEFT references bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from optimum_neuron_peft.checkpoint.consolidate import consolidate
from optimum_neuron_peft.checkpoint.verify import verify

from consolidation_helpers import (
    adapter_state,
    assert_adapter_loads_equal,
    assert_bit_equal,
    assert_model_loads_equal,
    model_state,
    write_optimum_neuron,
    write_ours,
)


@pytest.mark.parametrize("tp,pp,fuse_qkv", [(1, 1, False), (2, 1, True), (4, 2, False)])
def test_our_format_model_and_two_adapters(tmp_path, tp, pp, fuse_qkv):
    model = model_state(torch.bfloat16)
    first, second = adapter_state(seed=1), adapter_state(seed=2, targets=("q_proj", "v_proj", "down_proj"))
    write_ours(tmp_path / "ckpt", tp, pp, model=model, adapters={"first": first, "second": second}, fuse_qkv=fuse_qkv)
    result = consolidate(tmp_path / "ckpt", tmp_path / "out", verify=True)
    assert result.tensors == len(model) + len(first[0]) + len(second[0])
    assert result.bytes == sum(t.nbytes for s in (model, first[0], second[0]) for t in s.values())
    assert_model_loads_equal(tmp_path / "out", model)
    assert_adapter_loads_equal(tmp_path / "out" / "first", first[0])
    assert_adapter_loads_equal(tmp_path / "out" / "second", second[0])
    config = json.loads((tmp_path / "out" / "second" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


@pytest.mark.parametrize("serialization,metadata_format", [("plain", "json"), ("xser", "pt")])
def test_optimum_neuron_checkpoint_with_shared_lora_a(tmp_path, serialization, metadata_format):
    model = model_state(torch.float32)
    adapter = adapter_state(seed=3, shared_lora_a=True)
    write_optimum_neuron(
        tmp_path / "ckpt", 4, 2, serialization=serialization, model=model, adapter=adapter, fuse_qkv=True,
        metadata_format=metadata_format,
    )
    consolidate(tmp_path / "ckpt", tmp_path / "out", max_shard_size="40KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(index["weight_map"]) == sorted(model)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in model.values())
    assert_model_loads_equal(tmp_path / "out", model)
    assert_adapter_loads_equal(tmp_path / "out" / "default", adapter[0])
    verify(tmp_path / "ckpt", tmp_path / "out")


def test_adapter_only_dtype_cast_and_pytorch_format(tmp_path):
    model = model_state(torch.float32)
    first, second = adapter_state(seed=1), adapter_state(seed=2)
    write_ours(tmp_path / "ckpt", 2, model=model, adapters={"first": first, "second": second})
    consolidate(tmp_path / "ckpt", tmp_path / "one", adapter="second", dtype="bf16")
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert_adapter_loads_equal(tmp_path / "one", {k: v.to(torch.bfloat16) for k, v in second[0].items()})
    verify(tmp_path / "ckpt", tmp_path / "one", adapter="second", dtype="bf16")
    consolidate(tmp_path / "ckpt", tmp_path / "pt", format="pytorch", max_shard_size="100KB")
    index = json.loads((tmp_path / "pt" / "pytorch_model.bin.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(model)
    assert_model_loads_equal(tmp_path / "pt", model)
    saved = torch.load(tmp_path / "pt" / "first" / "adapter_model.bin", weights_only=True)
    for name, tensor in first[0].items():
        assert_bit_equal(saved[name], tensor, name)
    verify(tmp_path / "ckpt", tmp_path / "pt")


def test_adapter_config_must_target_the_saved_modules(tmp_path):
    adapter, config = adapter_state(seed=1, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    write_ours(tmp_path / "ckpt", 2, adapters={"default": (adapter, dict(config, target_modules=["q_proj", "k_proj", "v_proj"]))})
    with pytest.raises(Exception, match=r"adapter_config.json: target_modules \['k_proj', 'q_proj', 'v_proj'\] does not target model.layers.0.self_attn.o_proj"):
        consolidate(tmp_path / "ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # an optimum-neuron style config naming the fused module is restored to the original names
    write_ours(tmp_path / "fused", 2, adapters={"default": (adapter, dict(config, target_modules=["qkv_proj", "o_proj"]))})
    consolidate(tmp_path / "fused", tmp_path / "ok")
    restored = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())["target_modules"]
    assert restored == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert_adapter_loads_equal(tmp_path / "ok", adapter)


@pytest.mark.parametrize("writer", [write_ours, write_optimum_neuron])
def test_tied_embeddings_consolidate_to_a_loadable_model(tmp_path, writer):
    """A tied model's checkpoint holds embed_tokens only; Transformers ties lm_head to it when loading."""
    import transformers

    model = model_state(torch.bfloat16)
    model.pop("lm_head.weight")
    writer(tmp_path / "ckpt", 2, model=model, tie_word_embeddings=True)
    consolidate(tmp_path / "ckpt", tmp_path / "out", verify=True)
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert sorted(f.keys()) == sorted(model)
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True, dtype="auto")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    state = loaded.state_dict()
    for name, tensor in model.items():
        assert_bit_equal(state[name], tensor, name)
