"""Nothing is published that Transformers or PEFT would not load: the expected keys come from the libraries."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from consolidation_helpers import adapter_state, llama_config, model_state, write_optimum_neuron
from optimum_neuron_peft.checkpoint import consolidate, verify
from optimum_neuron_peft.checkpoint.known_keys import expected_keys_from_config
from optimum_neuron_peft.checkpoint.loadability import check_adapter_keys, check_model_keys, expected_model_keys
from optimum_neuron_peft.errors import CheckpointError


@pytest.fixture(scope="module")
def consolidated_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter")
    write_optimum_neuron(root / "ckpt", 2, adapter=adapter_state(shared_lora_a=True))
    consolidate(root / "ckpt", root / "out")
    return root


def test_expected_keys_are_transformers_own(tmp_path):
    config = llama_config(tie_word_embeddings=True)
    (tmp_path / "config.json").write_text(config.to_json_string())
    required, allowed = expected_model_keys(tmp_path / "config.json")
    assert allowed == set(transformers.LlamaForCausalLM(config).state_dict())
    assert allowed - required == {"lm_head.weight"}  # tied: Transformers re-ties it, a file may omit it


KEY_FIELDS = [{}, {"tie_word_embeddings": True}, {"attention_bias": True}, {"mlp_bias": True},
              {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}, {"num_hidden_layers": 0},
              {"architectures": ["LlamaForSequenceClassification"]}]  # fmt: skip


@pytest.mark.parametrize("fields", KEY_FIELDS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "defaults")
def test_keys_derived_from_a_llama_config_are_transformers_own(tmp_path, fields):
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
              "num_key_value_heads": 2, "num_hidden_layers": 3, "vocab_size": 50, **fields}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert expected_keys_from_config(config) == expected_model_keys(tmp_path / "config.json")


def test_keys_are_not_derived_for_what_is_not_known():
    llama = {"model_type": "llama", "num_hidden_layers": 2}
    assert expected_keys_from_config(llama) is not None
    for config in [{**llama, "model_type": "mistral"}, {**llama, "quantization_config": {}}, {**llama, "mlp_bias": "yes"},
                   {**llama, "num_hidden_layers": -1}, [llama]]:  # fmt: skip
        assert expected_keys_from_config(config) is None


def test_a_wrong_adapter_key_is_named(consolidated_adapter):
    out, config = consolidated_adapter / "out", consolidated_adapter / "ckpt" / "config.json"
    keys = set(load_file(out / "adapter_model.safetensors"))
    check_adapter_keys(keys, out, config)  # as written: exactly PEFT's keys
    good = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    doubled = "base_model.model." + good  # the optimum-neuron defect: prefix twice
    pair = {good, good.replace("lora_A", "lora_B")}
    moved = {k.replace("layers.0", "layers.7") for k in pair}  # a layer the base model does not have
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors: PeftModel.from_pretrained would not load .*2 keys it does not expect .*2 keys it expects are missing") as err:
        check_adapter_keys(keys - pair | moved, out, config)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="expected the prefix .* exactly once"):
        check_adapter_keys(keys - {good} | {doubled}, out, None)  # no config.json: the structural rules
    with pytest.raises(CheckpointError, match="a lora_A and a lora_B"):
        check_adapter_keys(keys - {good}, out, None)


def test_verify_refuses_an_adapter_peft_would_not_load(consolidated_adapter, tmp_path):
    out = consolidated_adapter / "out"
    tensors = load_file(out / "adapter_model.safetensors")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((out / "adapter_config.json").read_text())
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"] = torch.zeros(1)
    save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="holds tensors the checkpoint does not"):
        verify(consolidated_adapter / "ckpt", bad)


def test_consolidation_publishes_nothing_a_model_would_not_load(tmp_path):
    # A config.json that disagrees with the shards (one layer fewer): every tensor of layer 1 is unexpected.
    write_optimum_neuron(tmp_path / "ckpt", 2, model=model_state())  # no manifest: nothing else notices
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    for engine in ("torch", "torch-free"):
        out = tmp_path / f"out-{engine}"
        with pytest.raises(CheckpointError, match=r"AutoModelForCausalLM.from_pretrained would not load this output: \d+ keys it does not expect \(e.g. \['model.layers.1"):
            consolidate(tmp_path / "ckpt", out, engine=engine)
        assert not out.exists()


def test_model_key_check_names_missing_keys(tmp_path):
    (tmp_path / "config.json").write_text(llama_config().to_json_string())
    keys = set(model_state())
    check_model_keys(keys, tmp_path / "config.json", tmp_path)
    with pytest.raises(CheckpointError, match=r"1 keys it expects are missing \(e.g. \['model.norm.weight'\]\)"):
        check_model_keys(keys - {"model.norm.weight"}, tmp_path / "config.json", tmp_path)


def test_torch_free_engine_caches_the_expected_keys(tmp_path, monkeypatch):
    from optimum_neuron_peft.checkpoint.loadability import ExpectedModelKeys

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "llama.json").write_text(llama_config().to_json_string())
    derived = ExpectedModelKeys(tmp_path / "llama.json")  # a known architecture: no child, no cache
    assert derived._child is None and derived.result() == expected_model_keys(tmp_path / "llama.json")
    assert not (tmp_path / "cache").exists()
    # Another architecture: computed by a child process (torch stays out of ours), then cached.
    mistral = transformers.MistralConfig(**{k: getattr(llama_config(), k) for k in ("hidden_size", "intermediate_size",
                                            "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "vocab_size")})  # fmt: skip
    (tmp_path / "config.json").write_text(mistral.to_json_string())
    first = ExpectedModelKeys(tmp_path / "config.json")
    assert first._child is not None
    assert first.result() == expected_model_keys(tmp_path / "config.json")
    second = ExpectedModelKeys(tmp_path / "config.json")
    assert second._child is None and second.result() == first.result()
    (cache_file,) = (tmp_path / "cache").rglob("*.json")
    cache_file.write_text("{not json")  # a damaged cache entry is recomputed, not trusted
    third = ExpectedModelKeys(tmp_path / "config.json")
    assert third._child is not None and third.result() == first.result()
