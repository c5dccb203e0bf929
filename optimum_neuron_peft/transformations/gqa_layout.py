"""Which attention heads each tensor-parallel rank holds in the GQA QKV column-parallel layout.

Pure integer arithmetic, no tensors and no parallel state: tp size and rank are arguments.

Key/value heads are replicated ``kv_size_multiplier`` (m) times so that every rank holds at least one, and rank r
holds the r-th contiguous chunk of the K*m replicated heads:

- ``"tiled"`` (Trn1, optimum-neuron's default): replicas are laid out 0..K-1, 0..K-1, ...
- ``"interleaved"`` (Trn2): replicas are laid out 0,0,..,1,1,.. (``repeat_interleave``)

The H/K query heads of a group are split evenly between the m replicas of their key/value head, in order, and a
rank holds exactly the query heads of its key/value replicas. ``o_proj`` columns follow the same permutation.
"""

from __future__ import annotations

import math
from typing import Literal

from ..errors import SpecError

KVLayout = Literal["tiled", "interleaved"]
KV_LAYOUTS: tuple[str, ...] = ("tiled", "interleaved")


def gqa_shape_problem(tp_size: int, num_attention_heads: int, num_key_value_heads: int, kv_size_multiplier: int) -> str | None:
    """Why this head count / tp size / multiplier combination cannot be sharded, or None when it can."""
    H, K, m, tp = num_attention_heads, num_key_value_heads, kv_size_multiplier, tp_size
    if tp < 1 or K < 1 or H < 1 or m < 1:
        return f"tp_size, head counts and kv_size_multiplier must be >= 1, got tp={tp}, H={H}, K={K}, m={m}"
    if H % K != 0:
        return f"num_attention_heads={H} must be a multiple of num_key_value_heads={K}"
    if H % tp != 0:
        return f"num_attention_heads={H} is not divisible by tp_size={tp}; each rank must hold whole query heads"
    if (K * m) % tp != 0:
        return (
            f"num_key_value_heads * kv_size_multiplier = {K}*{m} = {K * m} is not divisible by tp_size={tp}, "
            "so ranks would not hold whole key/value heads"
        )
    if (H // K) % m != 0:
        return (
            f"kv_size_multiplier={m} must divide num_attention_heads / num_key_value_heads = {H // K}, so that each "
            "replica of a key/value head serves a whole share of its query heads"
        )
    per_rank = K * m // tp
    if K % per_rank != 0 and per_rank % K != 0:
        # A rank's chunk would straddle replicas unevenly, so the heads of a rank would not form whole groups.
        return (
            f"with kv_size_multiplier={m} each rank holds {per_rank} key/value heads, which neither divides nor is a "
            f"multiple of num_key_value_heads={K}"
        )
    return None


def valid_kv_size_multipliers(tp_size: int, num_attention_heads: int, num_key_value_heads: int) -> list[int]:
    """Every multiplier the layout allows for these head counts and tp size, smallest first."""
    if num_key_value_heads < 1 or num_attention_heads < 1 or num_attention_heads % num_key_value_heads != 0:
        return []
    group = num_attention_heads // num_key_value_heads
    return [
        m for m in range(1, group + 1) if gqa_shape_problem(tp_size, num_attention_heads, num_key_value_heads, m) is None
    ]


def check_gqa_shape(
    tp_size: int, num_attention_heads: int, num_key_value_heads: int, kv_size_multiplier: int, *, where: str = "GQA"
) -> None:
    """Raise a `SpecError` explaining why this combination cannot be sharded and which multipliers would work."""
    problem = gqa_shape_problem(tp_size, num_attention_heads, num_key_value_heads, kv_size_multiplier)
    if problem is not None:
        valid = valid_kv_size_multipliers(tp_size, num_attention_heads, num_key_value_heads)
        hint = f"valid kv_size_multiplier values here: {valid}" if valid else "no kv_size_multiplier works for this tp_size"
        raise SpecError(
            f"{where}: cannot shard num_attention_heads={num_attention_heads}, num_key_value_heads="
            f"{num_key_value_heads} over tp_size={tp_size} with kv_size_multiplier={kv_size_multiplier}: {problem}; {hint}"
        )


def default_kv_size_multiplier(tp_size: int, num_attention_heads: int, num_key_value_heads: int) -> int:
    """The smallest valid multiplier (tp / gcd(K, tp) whenever any multiplier works); a `SpecError` if none does."""
    valid = valid_kv_size_multipliers(tp_size, num_attention_heads, num_key_value_heads)
    if not valid:
        m = tp_size // math.gcd(max(num_key_value_heads, 1), tp_size)
        check_gqa_shape(tp_size, num_attention_heads, num_key_value_heads, m, where="GQA (automatic kv_size_multiplier)")
    return valid[0]


def kv_replicas_for_rank(
    tp_size: int, tp_rank: int, num_key_value_heads: int, kv_size_multiplier: int, layout: KVLayout = "tiled"
) -> list[tuple[int, int]]:
    """(key/value head, replica index) of each key/value head slot of ``tp_rank``, in local order."""
    K, m = num_key_value_heads, kv_size_multiplier
    if layout not in KV_LAYOUTS:
        raise SpecError(f"GQA: unknown kv layout {layout!r}, expected one of {KV_LAYOUTS}")
    if not 0 <= tp_rank < tp_size:
        raise SpecError(f"GQA: tp_rank={tp_rank} is out of range for tp_size={tp_size}")
    per_rank = K * m // tp_size
    positions = range(tp_rank * per_rank, (tp_rank + 1) * per_rank)
    if layout == "tiled":
        return [(p % K, p // K) for p in positions]
    return [(p // m, p % m) for p in positions]


def kv_head_indices_for_rank(
    tp_size: int, tp_rank: int, num_key_value_heads: int, kv_size_multiplier: int, layout: KVLayout = "tiled"
) -> list[int]:
    """Original key/value head index of each local key/value head slot of ``tp_rank``."""
    return [head for head, _ in kv_replicas_for_rank(tp_size, tp_rank, num_key_value_heads, kv_size_multiplier, layout)]


def query_head_indices_for_rank(
    tp_size: int,
    tp_rank: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    kv_size_multiplier: int,
    layout: KVLayout = "tiled",
) -> list[int]:
    """Original query head index of each local query head slot of ``tp_rank`` (the query / o_proj permutation)."""
    check_gqa_shape(tp_size, num_attention_heads, num_key_value_heads, kv_size_multiplier)
    group = num_attention_heads // num_key_value_heads
    share = group // kv_size_multiplier  # query heads served by one replica
    heads: list[int] = []
    for kv_head, replica in kv_replicas_for_rank(
        tp_size, tp_rank, num_key_value_heads, kv_size_multiplier, layout
    ):
        first = kv_head * group + replica * share
        heads.extend(range(first, first + share))
    return heads
