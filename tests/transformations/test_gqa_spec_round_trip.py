"""original -> per-rank shards -> original is bit-exact for the GQA QKV spec."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_neuron_peft.errors import SpecError
from optimum_neuron_peft.transformations.gqa_layout import valid_kv_size_multipliers
from spec_cases import assert_bit_exact, attention_weights, gqa_round_trip, shard_all_ranks

HEAD_COUNTS = [(32, 8), (32, 4), (8, 2), (14, 2), (40, 8), (32, 32)]
TP_SIZES = [1, 2, 4, 8, 16, 32]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("H,K", HEAD_COUNTS, ids=lambda v: str(v))
@pytest.mark.parametrize("tp", TP_SIZES)
def test_round_trip_every_valid_multiplier(H, K, tp):
    multipliers = valid_kv_size_multipliers(tp, H, K)
    if not multipliers:
        pytest.skip(f"H={H}, K={K} cannot be sharded over tp={tp} (checked in the error tests)")
    for m, fuse_qkv, bias, dtype in itertools.product(multipliers, [False, True], [False, True], DTYPES):
        spec, original, sharded, rebuilt = gqa_round_trip(H, K, tp, m, 2, 8, fuse_qkv, bias, dtype)
        assert_bit_exact(rebuilt, original)


# A readable table of named real-world shapes (head_dim reduced to keep tensors tiny).
NAMED_CASES = {
    "llama3-8b tp8 (32q/8kv, m=1)": dict(H=32, K=8, tp=8, m=1),
    "llama3-8b tp32 (kv replicated x4)": dict(H=32, K=8, tp=32, m=4),
    "llama2-13b tp8 (40 MHA heads)": dict(H=40, K=40, tp=8, m=1),
    "qwen-0.5b-like tp2 (14q/2kv)": dict(H=14, K=2, tp=2, m=1),
    "32q/4kv tp8 m=2 (reference case)": dict(H=32, K=4, tp=8, m=2),
    "32q/4kv tp8 m=8 (reference case)": dict(H=32, K=4, tp=8, m=8),
    "tiny 8q/2kv tp4 m=2": dict(H=8, K=2, tp=4, m=2),
    "tiny 8q/2kv tp16 impossible": dict(H=8, K=2, tp=16, m=8, error="not divisible by tp_size=16"),
}


@pytest.mark.parametrize("name", list(NAMED_CASES))
@pytest.mark.parametrize("fuse_qkv", [False, True], ids=["separate-qkv", "fused-qkv"])
@pytest.mark.parametrize("layout", ["tiled", "interleaved"])
def test_named_cases(name, fuse_qkv, layout):
    case = dict(NAMED_CASES[name])
    error = case.pop("error", None)
    if error:
        with pytest.raises(SpecError, match=error):
            gqa_round_trip(**case, head_dim=2, hidden=8, fuse_qkv=fuse_qkv, bias=True, dtype=torch.float32, kv_layout=layout)
        return
    spec, original, sharded, rebuilt = gqa_round_trip(
        **case, head_dim=4, hidden=8, fuse_qkv=fuse_qkv, bias=True, dtype=torch.bfloat16, kv_layout=layout, lora_r=2
    )
    assert_bit_exact(rebuilt, original)
    key = "attn.qkv_proj.weight_qkv" if fuse_qkv else "attn.qkv_proj.weight_k"
    rows = (case["H"] * 4 // case["tp"]) + 2 * spec.kv_output_size_per_partition if fuse_qkv else spec.kv_output_size_per_partition
    assert all(t.shape == (rows, 8) for t in sharded[key])


@st.composite
def gqa_shapes(draw):
    K = draw(st.sampled_from([1, 2, 3, 4, 8]))
    group = draw(st.sampled_from([1, 2, 3, 4, 8]))
    H = K * group
    tp = draw(st.sampled_from([d for d in (1, 2, 3, 4, 6, 8, 16, 32) if H % d == 0]))
    multipliers = valid_kv_size_multipliers(tp, H, K)
    m = draw(st.sampled_from(multipliers)) if multipliers else None
    return H, K, tp, m


@settings(max_examples=150, deadline=None)
@given(
    shape=gqa_shapes(),
    head_dim=st.integers(1, 4),
    hidden=st.integers(1, 6),
    fuse_qkv=st.booleans(),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    layout=st.sampled_from(["tiled", "interleaved"]),
    lora_r=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(shape, head_dim, hidden, fuse_qkv, bias, dtype, layout, lora_r, seed):
    H, K, tp, m = shape
    if m is None:
        with pytest.raises(SpecError):
            gqa_round_trip(H, K, tp, None, head_dim, hidden, fuse_qkv, bias, dtype, layout, lora_r, seed)
        return
    _, original, _, rebuilt = gqa_round_trip(H, K, tp, m, head_dim, hidden, fuse_qkv, bias, dtype, layout, lora_r, seed)
    assert_bit_exact(rebuilt, original)


def test_kv_replicas_hold_identical_rows():
    # 8q/2kv over tp=4 with m=2: ranks 0 and 2 hold kv head 0, ranks 1 and 3 hold kv head 1 (tiled).
    spec, original, sharded, _ = gqa_round_trip(8, 2, 4, 2, 4, 8, False, False, torch.float32)
    k = sharded["attn.qkv_proj.weight_k"]
    torch.testing.assert_close(k[0], original["attn.k_proj.weight"][0:4], rtol=0, atol=0)
    torch.testing.assert_close(k[2], k[0], rtol=0, atol=0)
    torch.testing.assert_close(k[1], original["attn.k_proj.weight"][4:8], rtol=0, atol=0)
    # rank 1 holds query heads 4, 5 (the first half of kv head 1's group) -> rows 16..23 of q_proj
    torch.testing.assert_close(sharded["attn.qkv_proj.weight_q"][1], original["attn.q_proj.weight"][16:24], rtol=0, atol=0)
    # o_proj columns follow the same permutation
    torch.testing.assert_close(sharded["attn.o_proj.weight"][1], original["attn.o_proj.weight"][:, 16:24], rtol=0, atol=0)


def test_matches_optimum_neuron_repeat_and_chunk_rule_for_kv():
    # optimum-neuron: weight.repeat(m, 1), split into per-partition chunks, rank r takes chunk r.
    spec, original, sharded, _ = gqa_round_trip(32, 4, 8, 4, 2, 4, False, False, torch.float32)
    chunks = original["attn.k_proj.weight"].repeat(4, 1).split(spec.kv_output_size_per_partition)
    for rank in range(8):
        torch.testing.assert_close(sharded["attn.qkv_proj.weight_k"][rank], chunks[rank], rtol=0, atol=0)


def test_reads_optimum_neuron_shared_lora_a_and_fused_lora_b():
    spec, original, sharded, _ = gqa_round_trip(8, 2, 4, 2, 4, 8, True, False, torch.float32, lora_r=2)
    shared_a = original["attn.q_proj.lora_A.weight"]
    optimum = {
        "attn.qkv_proj.lora_A.weight": [shared_a] * 4,
        "attn.qkv_proj.lora_B.weight_qkv": [
            torch.cat([sharded[f"attn.qkv_proj.lora_B.weight_{s}"][r] for s in "qkv"]) for r in range(4)
        ],
    }
    rebuilt, consumed = spec.to_original_weights("attn", optimum, {})
    assert sorted(consumed) == sorted(optimum)
    for p in "qkv":
        torch.testing.assert_close(rebuilt[f"attn.{p}_proj.lora_A.weight"], shared_a, rtol=0, atol=0)
        torch.testing.assert_close(rebuilt[f"attn.{p}_proj.lora_B.weight"], original[f"attn.{p}_proj.lora_B.weight"], rtol=0, atol=0)


def test_partial_lora_targets_round_trip():
    spec, original, _, _ = gqa_round_trip(8, 2, 2, 1, 4, 8, False, False, torch.float32, lora_r=2)
    partial = {k: v for k, v in original.items() if "lora" in k and ("q_proj" in k or "v_proj" in k)}
    sharded = shard_all_ranks(spec, "attn", partial)
    assert sorted(sharded) == sorted(
        f"attn.qkv_proj.lora_{ab}.weight_{s}" for ab in "AB" for s in "qv"
    )
    rebuilt, _ = spec.to_original_weights("attn", sharded, {})
    assert_bit_exact(rebuilt, partial)


def test_lazy_safetensors_slices_give_the_same_shards(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    spec, original, sharded, _ = gqa_round_trip(8, 2, 4, 2, 4, 8, False, True, torch.float32, lora_r=2)
    save_file(original, tmp_path / "w.safetensors")
    with safe_open(tmp_path / "w.safetensors", "pt") as f:
        lazy = {name: f.get_slice(name) for name in f.keys()}
        for rank in range(4):
            local, _ = spec.adapt_state_dict("attn", lazy, rank)
            for name, tensor in local.items():
                torch.testing.assert_close(tensor, sharded[name][rank], rtol=0, atol=0)


def test_missing_and_misshapen_tensors_are_named():
    spec, original, sharded, _ = gqa_round_trip(8, 2, 2, 1, 4, 8, False, False, torch.float32)
    missing = dict(original)
    del missing["attn.v_proj.weight"]
    with pytest.raises(SpecError, match=r"missing original tensors \['attn.v_proj.weight'\]"):
        spec.adapt_state_dict("attn", missing, 0)
    bad = dict(original, **{"attn.k_proj.weight": torch.zeros(12, 8)})
    with pytest.raises(SpecError, match=r"attn.k_proj.weight: expected 2 heads x head_dim 4 = 8 rows, found shape \(12, 8\)"):
        spec.adapt_state_dict("attn", bad, 0)
    bad_o = dict(original, **{"attn.o_proj.weight": torch.zeros(8, 30)})
    with pytest.raises(SpecError, match="attn.o_proj.weight: expected 32 columns"):
        spec.adapt_state_dict("attn", bad_o, 0)
    short = dict(sharded, **{"attn.qkv_proj.weight_q": sharded["attn.qkv_proj.weight_q"][:1]})
    with pytest.raises(SpecError, match=r"attn.qkv_proj.weight_q: expected one tensor per rank for tp_size=2, found 1"):
        spec.to_original_weights("attn", short, {})
    wrong_rows = dict(sharded, **{"attn.qkv_proj.weight_k": [t[:2] for t in sharded["attn.qkv_proj.weight_k"]]})
    with pytest.raises(SpecError, match=r"attn.qkv_proj.weight_k: rank 0 holds shape \(2, 8\), expected 4 rows"):
        spec.to_original_weights("attn", wrong_rows, {})
    with pytest.raises(SpecError, match="tp_rank=2 is out of range for tp_size=2"):
        spec.adapt_state_dict("attn", original, 2)


def test_attention_weights_helper_is_deterministic():
    a = attention_weights(8, 2, 4, 8, True, torch.float32, seed=3)
    b = attention_weights(8, 2, 4, 8, True, torch.float32, seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)
