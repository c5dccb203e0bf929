"""The specs read from safetensors files through `FileSlice` (views for single row ranges, positioned reads
straight into the result for concatenated rows) give bit for bit the shards they give from in-memory tensors."""

import pytest
import torch
from safetensors.torch import save_file

from optimum_neuron_peft import FusedLinearsSpec
from optimum_neuron_peft.formats.stored_tensor import read_safetensors_header
from optimum_neuron_peft.models.loading import FileSlice
from optimum_neuron_peft.transformations.gqa_qkv import GQAQKVColumnParallelLinearSpec
from spec_cases import attention_weights, shard_all_ranks


def _file_slices(tensors, path):
    # An odd-sized tensor first: the others start at offsets that are not multiples of their row size.
    save_file({"aaa.odd": torch.ones(3, dtype=torch.uint8), **tensors}, path)
    return {name: FileSlice(stored) for name, stored in read_safetensors_header(path).items() if name != "aaa.odd"}


def _assert_same_shards(spec, module, tensors, tmp_path):
    expected = shard_all_ranks(spec, module, tensors)
    got = shard_all_ranks(spec, module, _file_slices(tensors, tmp_path / "w.safetensors"))
    assert sorted(got) == sorted(expected)
    for name, shards in expected.items():
        for rank, shard in enumerate(shards):
            assert got[name][rank].dtype == shard.dtype
            torch.testing.assert_close(got[name][rank], shard, rtol=0, atol=0, msg=lambda m: f"{name} rank {rank}: {m}")


@pytest.mark.parametrize("fuse_qkv", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("layout", ["tiled", "interleaved"])
@pytest.mark.parametrize("H,K,tp,m", [(8, 2, 4, 2), (8, 2, 8, 4), (16, 4, 2, 1), (8, 8, 4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gqa_qkv_from_files(tmp_path, fuse_qkv, layout, H, K, tp, m, dtype):
    spec = GQAQKVColumnParallelLinearSpec.create(
        num_attention_heads=H, num_key_value_heads=K, head_dim=4, tp_size=tp, kv_size_multiplier=m,
        fuse_qkv=fuse_qkv, bias=True, kv_layout=layout,
    )  # fmt: skip
    _assert_same_shards(spec, "attn", attention_weights(H, K, 4, 12, True, dtype, lora_r=2), tmp_path)


@pytest.mark.parametrize("fuse_axis", ["column", "row"])
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_linears_from_files(tmp_path, fuse_axis, tp, dtype):
    gen = torch.Generator().manual_seed(0)
    dims, other = [8, 12], 6
    tensors = {}
    for name, d in zip(["gate_proj", "up_proj"], dims):
        shape = (d, other) if fuse_axis == "column" else (other, d)
        tensors[f"mlp.{name}.weight"] = torch.randn(shape, generator=gen).to(dtype)
        tensors[f"mlp.{name}.bias"] = torch.randn(d if fuse_axis == "column" else other, generator=gen).to(dtype)
    spec = FusedLinearsSpec("gate_up_proj", ["gate_proj", "up_proj"], True, fuse_axis, dims, tp_size=tp)
    _assert_same_shards(spec, "mlp", tensors, tmp_path)
