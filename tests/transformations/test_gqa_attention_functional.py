"""Functional check: attention computed rank by rank from the GQA shards equals Transformers' LlamaAttention.

Each simulated rank runs attention on its own query heads against its own (replicated) key/value heads, then its
o_proj shard; concatenating the per-rank attention outputs and summing the per-rank o_proj partial outputs (what
the row-parallel all-reduce does) must give the single-device output computed with the original weights.
"""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding, apply_rotary_pos_emb

from optimum_neuron_peft import GQAQKVColumnParallelLinearSpec
from spec_cases import shard_all_ranks

CASES = [
    # (heads, kv heads, tp, multiplier, layout)
    (8, 2, 4, 2, "tiled"),
    (8, 2, 4, 4, "tiled"),
    (8, 2, 4, 2, "interleaved"),
    (8, 8, 2, 1, "tiled"),
    (8, 1, 8, 8, "tiled"),
    (12, 4, 2, 1, "tiled"),
    (12, 3, 4, 4, "interleaved"),
]


def rank_attention(hidden, local, prefix, q_heads, kv_heads, head_dim, cos, sin, fuse_qkv, bias):
    """Attention of one rank from its local weights only; returns (attention output, o_proj partial output)."""
    b, s, _ = hidden.shape
    if fuse_qkv:
        w = local[f"{prefix}.qkv_proj.weight_qkv"]
        bias_qkv = local.get(f"{prefix}.qkv_proj.bias_qkv")
        qkv = torch.nn.functional.linear(hidden, w, bias_qkv)
        q, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    else:
        q, k, v = (
            torch.nn.functional.linear(hidden, local[f"{prefix}.qkv_proj.weight_{x}"], local.get(f"{prefix}.qkv_proj.bias_{x}"))
            for x in "qkv"
        )
    q = q.view(b, s, q_heads, head_dim).transpose(1, 2)
    k = k.view(b, s, kv_heads, head_dim).transpose(1, 2)
    v = v.view(b, s, kv_heads, head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    # local query slot i attends local kv slot i // (q_heads / kv_heads)
    k = k.repeat_interleave(q_heads // kv_heads, dim=1)
    v = v.repeat_interleave(q_heads // kv_heads, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = out.transpose(1, 2).reshape(b, s, q_heads * head_dim)
    return out, torch.nn.functional.linear(out, local[f"{prefix}.o_proj.weight"])


@pytest.mark.parametrize("H,K,tp,m,layout", CASES)
@pytest.mark.parametrize("fuse_qkv", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_sharded_attention_equals_transformers(H, K, tp, m, layout, fuse_qkv, bias):
    torch.manual_seed(0)
    head_dim, hidden_size = 8, 48
    config = LlamaConfig(
        hidden_size=hidden_size, num_attention_heads=H, num_key_value_heads=K, head_dim=head_dim,
        attention_bias=bias, max_position_embeddings=64,
    )
    config._attn_implementation = "sdpa"
    reference = LlamaAttention(config, layer_idx=0).eval()
    for p in reference.parameters():
        torch.nn.init.normal_(p, std=0.2)
    original = {f"attn.{n}": p.detach().clone() for n, p in reference.named_parameters()}
    spec = GQAQKVColumnParallelLinearSpec.create(
        num_attention_heads=H, num_key_value_heads=K, head_dim=head_dim, tp_size=tp, kv_size_multiplier=m,
        fuse_qkv=fuse_qkv, bias=bias, kv_layout=layout,
    )
    sharded = shard_all_ranks(spec, "attn", {n: t for n, t in original.items() if n != "attn.o_proj.bias"})

    x = torch.randn(2, 7, hidden_size)
    position_ids = torch.arange(7).unsqueeze(0).expand(2, -1)
    cos, sin = LlamaRotaryEmbedding(config)(x, position_ids)
    with torch.no_grad():
        expected, _ = reference(x, position_embeddings=(cos, sin), attention_mask=None, is_causal=True)
        outputs, partials = [], []
        for rank in range(tp):
            local = {name: shards[rank] for name, shards in sharded.items()}
            out, partial = rank_attention(x, local, "attn", H // tp, K * m // tp, head_dim, cos, sin, fuse_qkv, bias)
            outputs.append(out)
            partials.append(partial)
        total = torch.stack(partials).sum(0)
        if bias:
            total = total + original["attn.o_proj.bias"]
        # the concatenated per-rank attention outputs times the concatenated o_proj shards: the same result
        o_full_permuted = torch.cat(sharded["attn.o_proj.weight"], dim=1)
        concatenated = torch.nn.functional.linear(torch.cat(outputs, dim=-1), o_full_permuted, original.get("attn.o_proj.bias"))
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(concatenated, expected, rtol=1e-5, atol=1e-5)


def test_a_wrong_permutation_would_be_caught():
    """Guard against a vacuous check: identity-ordered query shards give a different output when m > 1."""
    torch.manual_seed(0)
    H, K, tp, head_dim = 8, 2, 4, 8
    config = LlamaConfig(hidden_size=32, num_attention_heads=H, num_key_value_heads=K, head_dim=head_dim)
    config._attn_implementation = "sdpa"
    reference = LlamaAttention(config, layer_idx=0).eval()
    original = {f"attn.{n}": p.detach().clone() for n, p in reference.named_parameters()}
    spec = GQAQKVColumnParallelLinearSpec.create(num_attention_heads=H, num_key_value_heads=K, head_dim=head_dim, tp_size=tp)
    sharded = shard_all_ranks(spec, "attn", original)
    sharded["attn.qkv_proj.weight_q"] = list(original["attn.q_proj.weight"].chunk(tp))
    sharded["attn.o_proj.weight"] = list(original["attn.o_proj.weight"].chunk(tp, dim=1))
    x = torch.randn(1, 5, 32)
    cos, sin = LlamaRotaryEmbedding(config)(x, torch.arange(5).unsqueeze(0))
    with torch.no_grad():
        expected, _ = reference(x, position_embeddings=(cos, sin), attention_mask=None, is_causal=True)
        total = sum(
            rank_attention(x, {n: s[r] for n, s in sharded.items()}, "attn", H // tp, K * 2 // tp, head_dim, cos, sin, False, False)[1]
            for r in range(tp)
        )
    assert not torch.allclose(total, expected, atol=1e-3)
