"""Single-process checks of loading: names, metadata, sharded checkpoints, dtype, and every user error."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from optimum_neuron_peft.errors import CheckpointError, ConfigError
from optimum_neuron_peft.models import AutoModelForCausalLM, LlamaForCausalLM, ParallelPlan
from optimum_neuron_peft.parallel import TensorParallel

SPEC_COVERED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")


def _config(**kw):
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    return transformers.LlamaConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(_config())
    path = tmp_path_factory.mktemp("llama")
    ref.save_pretrained(path, safe_serialization=True)
    return ref, path


def _copy_with(tmp_path, src, edit):
    """A copy of the checkpoint at ``src`` whose state dict went through ``edit``."""
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    return tmp_path


def test_parameter_names_follow_transformers_outside_specs(checkpoint):
    ref, path = checkpoint
    model = AutoModelForCausalLM.from_pretrained(path)
    ours = {n for n, _ in model.named_parameters()}
    theirs = {n for n, _ in ref.named_parameters()}
    assert {n for n in theirs if not any(f".{p}." in n for p in SPEC_COVERED)} | {"model.layers.0.self_attn.o_proj.weight",
            "model.layers.1.self_attn.o_proj.weight"} == {n for n in ours if "qkv_proj" not in n and "gate_up_proj" not in n}  # fmt: skip
    assert "model.layers.1.self_attn.qkv_proj.weight_q" in ours and "model.layers.1.mlp.gate_up_proj.weight" in ours
    meta = model.parameters_metadata()["parameters"]
    assert meta["model.layers.0.mlp.gate_up_proj.weight"] == {
        "tensor_model_parallel": True, "partition_dim": 0, "partition_stride": 2, "num_partitions": 1}  # fmt: skip
    assert set(model.original_parameter_shapes()) == theirs
    assert type(model) is LlamaForCausalLM and model.config.model_type == "llama"


def test_index_sharded_checkpoint_and_dtype(checkpoint, tmp_path):
    ref, _ = checkpoint
    ref.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")  # q/k/v land in different files
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-6)
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in bf16.parameters()) and not any(b.is_meta for b in bf16.buffers())


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match=r"unsupported architecture.*gpt2.*supported model types.*'granite'.*'llama'"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_head_counts_the_layout_cannot_shard(checkpoint, tmp_path):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(_config(num_attention_heads=6, num_key_value_heads=3, hidden_size=36)).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"llama \(num_attention_heads=6, num_key_value_heads=3\) at tensor-parallel size 4"):
        AutoModelForCausalLM.from_pretrained(tmp_path, tp=TensorParallel(4, 0))
    with pytest.raises(ConfigError, match="kv_size_multiplier=3"):
        AutoModelForCausalLM.from_pretrained(checkpoint[1], tp=TensorParallel(2, 0), kv_size_multiplier=3)


def test_vocab_not_divisible_by_tp(tmp_path):
    with pytest.raises(ConfigError, match="vocab_size=63 is not divisible by the tensor-parallel size 2"):
        LlamaForCausalLM(_config(vocab_size=63), ParallelPlan(TensorParallel(2, 1), device="meta"))


def test_missing_tensor(checkpoint, tmp_path):
    path = _copy_with(tmp_path, checkpoint[1], lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensors.*model.layers.1.self_attn.k_proj.weight.*model.safetensors"):
        AutoModelForCausalLM.from_pretrained(path)


def test_misshapen_tensor(checkpoint, tmp_path):
    def edit(t):
        t["model.layers.0.mlp.down_proj.weight"] = torch.zeros(32, 40)

    path = _copy_with(tmp_path, checkpoint[1], edit)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor model.layers.0.mlp.down_proj.weight has shape \(32, 40\), expected \(32, 48\)"):
        AutoModelForCausalLM.from_pretrained(path)


def test_unexpected_tensor(checkpoint, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)

    path = _copy_with(tmp_path, checkpoint[1], edit)
    with pytest.raises(CheckpointError, match=r"match no parameter.*model.layers.0.self_attn.extra.weight"):
        AutoModelForCausalLM.from_pretrained(path)


def test_no_safetensors(tmp_path, checkpoint):
    (tmp_path / "config.json").write_text((checkpoint[1] / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_sequence_parallel_needs_divisible_sequence(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint[1], sequence_parallel=True, tp=TensorParallel.single())
    model(torch.zeros(1, 5, dtype=torch.long))  # tp = 1: any length
    model.plan = ParallelPlan(TensorParallel(2, 0), sequence_parallel=True)  # only the check reads it
    model.tp = model.plan.tp
    with pytest.raises(ConfigError, match="sequence length divisible by the tensor-parallel size 2, got 5"):
        model(torch.zeros(1, 5, dtype=torch.long))


def test_save_pretrained_writes_the_sharded_format(checkpoint, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(checkpoint[1])
    out = model.save_pretrained(tmp_path / "saved")
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert "config.json" in files and any("tp_rank_00" in f for f in files), sorted(files)
