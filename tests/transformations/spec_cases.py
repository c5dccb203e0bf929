"""Helpers shared by the spec tests: random original weights of an attention block and a round-trip driver."""

from __future__ import annotations

import torch

from optimum_neuron_peft.transformations import GQAQKVColumnParallelLinearSpec


def attention_weights(H: int, K: int, head_dim: int, hidden: int, bias: bool, dtype, seed: int = 0, lora_r: int = 0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    sd = {
        "attn.q_proj.weight": rand(H * head_dim, hidden),
        "attn.k_proj.weight": rand(K * head_dim, hidden),
        "attn.v_proj.weight": rand(K * head_dim, hidden),
        "attn.o_proj.weight": rand(hidden, H * head_dim),
    }
    if bias:
        sd.update({
            "attn.q_proj.bias": rand(H * head_dim),
            "attn.k_proj.bias": rand(K * head_dim),
            "attn.v_proj.bias": rand(K * head_dim),
        })
    if lora_r:
        for p, rows in (("q", H), ("k", K), ("v", K)):
            sd[f"attn.{p}_proj.lora_A.weight"] = rand(lora_r, hidden)
            sd[f"attn.{p}_proj.lora_B.weight"] = rand(rows * head_dim, lora_r)
        sd["attn.o_proj.lora_A.weight"] = rand(lora_r, H * head_dim)
    return sd


def shard_all_ranks(spec, module: str, state_dict) -> dict[str, list[torch.Tensor]]:
    """{custom name: [tensor per rank]} produced by the spec for every rank."""
    per_rank = [spec.adapt_state_dict(module, state_dict, rank) for rank in range(spec.tp_size)]
    for local, consumed in per_rank:
        assert sorted(consumed) == sorted(state_dict), "every original tensor must be consumed"
    return {name: [local[name] for local, _ in per_rank] for name in per_rank[0][0]}


def gqa_round_trip(H, K, tp, m, head_dim, hidden, fuse_qkv, bias, dtype, kv_layout="tiled", lora_r=0, seed=0):
    spec = GQAQKVColumnParallelLinearSpec.create(
        num_attention_heads=H, num_key_value_heads=K, head_dim=head_dim, tp_size=tp, kv_size_multiplier=m,
        fuse_qkv=fuse_qkv, bias=bias, kv_layout=kv_layout,
    )
    original = attention_weights(H, K, head_dim, hidden, bias, dtype, seed, lora_r)
    sharded = shard_all_ranks(spec, "attn", original)
    rebuilt, consumed = spec.to_original_weights("attn", sharded, {})
    assert sorted(consumed) == sorted(sharded)
    return spec, original, sharded, rebuilt


def assert_bit_exact(rebuilt, original):
    assert sorted(rebuilt) == sorted(original)
    for name, tensor in original.items():
        torch.testing.assert_close(rebuilt[name], tensor, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
        assert rebuilt[name].dtype == tensor.dtype
