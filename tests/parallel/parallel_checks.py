"""Checks of the tensor-parallel runtime against single-device references, runnable at any tp size.

Each check builds the FULL weights and inputs from fixed seeds (identical on every rank), shards them by hand with
the partition rules of docs/checkpoint_formats.md section 2, runs the parallel layer on this rank's shard and asserts that outputs
and gradients equal this rank's part of the single-device reference (torch.nn.functional). A failed comparison
raises AssertionError. Data-moving operations are compared bit-exactly.

`cases(tp_size)` is the table run in one process per rank (spawned once per world size by the tests, or in-process
at tp = 1), so many cases share one process start.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from optimum_neuron_peft.errors import ConfigError
from optimum_neuron_peft.parallel import (
    ColumnParallelLinear,
    GQAQKVColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    TensorParallel,
    allreduce_sequence_parallel_gradients,
    copy_to_tensor_parallel_region,
    destroy_model_parallel,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    get_data_parallel_rank,
    get_data_parallel_size,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_size,
    initialize_model_parallel,
    parallel_cross_entropy,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)
from optimum_neuron_peft.parallel import collectives
from optimum_neuron_peft.transformations.gqa_layout import (
    gqa_shape_problem,
    kv_head_indices_for_rank,
    query_head_indices_for_rank,
)

B, S, IN, OUT = 2, 4, 8, 16  # S, IN, OUT divisible by every tp (and tp * stride) used here


def rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def shard(full: torch.Tensor, dim: int, size: int, rank: int, stride: int = 1) -> torch.Tensor:
    """docs/checkpoint_formats.md section 2: chunks of size_per_rank / stride along ``dim``; rank r takes chunks r, r+tp, ..."""
    chunk = full.shape[dim] // size // stride
    return torch.cat(full.split(chunk, dim=dim)[rank::size], dim=dim)


def head_rows(full: torch.Tensor, heads: list[int], head_dim: int, dim: int = 0) -> torch.Tensor:
    return torch.cat([full.narrow(dim, h * head_dim, head_dim) for h in heads], dim=dim)


def close(actual: torch.Tensor, expected: torch.Tensor, what: str, exact: bool = False) -> None:
    tol = 0.0 if exact else 1e-5
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def load(param: torch.Tensor | None, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value)


# --------------------------------------------------------------------------------------------------- linear layers
def check_column(tp: TensorParallel, bias: bool, gather_output: bool, sp: bool, stride: int = 1) -> None:
    n, r = tp.size, tp.rank
    W, b, x, gy = rand(1, OUT, IN), rand(2, OUT), rand(3, B, S, IN), rand(4, B, S, OUT)
    xr, Wr, br = leaf(x), leaf(W), leaf(b)
    yr = F.linear(xr, Wr, br if bias else None)
    (yr * gy).sum().backward()

    layer = ColumnParallelLinear(IN, OUT, bias, gather_output, sp, tp=tp, stride=stride)
    assert layer.weight.shape == (OUT // n, IN) and layer.weight.partition_dim == 0
    assert layer.weight.partition_stride == stride and layer.weight.num_partitions == n
    load(layer.weight, shard(W, 0, n, r, stride))
    if bias:
        load(layer.bias, shard(b, 0, n, r, stride))
    xin = leaf(shard(x, 1, n, r) if sp else x)
    y = layer(xin)
    expected, g = (yr, gy) if gather_output else (shard(yr, 2, n, r, stride), shard(gy, 2, n, r, stride))
    close(y, expected, "output")
    (y * g).sum().backward()
    close(layer.weight.grad, shard(Wr.grad, 0, n, r, stride), "weight grad")
    if bias:
        close(layer.bias.grad, shard(br.grad, 0, n, r, stride), "bias grad")
    close(xin.grad, shard(xr.grad, 1, n, r) if sp else xr.grad, "input grad")


def check_row(tp: TensorParallel, bias: bool, input_is_parallel: bool, sp: bool) -> None:
    n, r = tp.size, tp.rank
    W, b, x, gy = rand(11, OUT, IN), rand(12, OUT), rand(13, B, S, IN), rand(14, B, S, OUT)
    xr, Wr, br = leaf(x), leaf(W), leaf(b)
    (F.linear(xr, Wr, br if bias else None) * gy).sum().backward()
    yr = F.linear(x, W, b if bias else None)

    layer = RowParallelLinear(IN, OUT, bias, input_is_parallel, sp, tp=tp)
    assert layer.weight.shape == (OUT, IN // n) and layer.weight.partition_dim == 1
    load(layer.weight, shard(W, 1, n, r))
    if bias:
        assert layer.bias.shape == (OUT,) and layer.bias.tensor_model_parallel is False
        load(layer.bias, b)
    xin = leaf(shard(x, 2, n, r) if input_is_parallel else x)
    y = layer(xin)
    expected, g = (shard(yr, 1, n, r), shard(gy, 1, n, r)) if sp else (yr, gy)
    close(y, expected, "output")
    (y * g).sum().backward()
    allreduce_sequence_parallel_gradients(layer, tp)
    close(layer.weight.grad, shard(Wr.grad, 1, n, r), "weight grad")
    if bias:
        close(layer.bias.grad, br.grad, "bias grad")
    close(xin.grad, shard(xr.grad, 2, n, r) if input_is_parallel else xr.grad, "input grad")


def check_embedding(tp: TensorParallel, padding_idx: int | None, sp: bool) -> None:
    n, r = tp.size, tp.rank
    vocab, dim = OUT, IN
    W, gy = rand(21, vocab, dim), rand(22, B, S, dim)
    ids = torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(23))
    if padding_idx is not None:
        ids[0, 0] = ids[1, 2] = padding_idx
    Wr = leaf(W)
    yr = F.embedding(ids, Wr, padding_idx)
    (yr * gy).sum().backward()

    layer = ParallelEmbedding(vocab, dim, padding_idx, tp=tp, sequence_parallel_enabled=sp)
    load(layer.weight, shard(W, 0, n, r))
    y = layer(ids)
    expected, g = (shard(yr, 1, n, r), shard(gy, 1, n, r)) if sp else (yr, gy)
    close(y, expected, "output")
    (y * g).sum().backward()
    close(layer.weight.grad, shard(Wr.grad, 0, n, r), "weight grad")


# -------------------------------------------------------------------------------------------------------- mappings
def _per_rank(seed: int, tp: TensorParallel, *shape: int) -> list[torch.Tensor]:
    return [rand(seed + k, *shape) for k in range(tp.size)]


def check_mappings(tp: TensorParallel) -> None:
    n, r = tp.size, tp.rank
    H = OUT
    xs, gs = _per_rank(100, tp, B, S, H), _per_rank(200, tp, B, S, H)
    common = rand(300, B, S, H)

    x = leaf(xs[r])
    y = copy_to_tensor_parallel_region(x, tp)
    close(y, xs[r], "copy fwd", exact=True)
    y.backward(gs[r])
    close(x.grad, sum(gs), "copy bwd")

    x = leaf(xs[r])
    y = reduce_from_tensor_parallel_region(x, tp)
    close(y, sum(xs), "reduce fwd")
    y.backward(gs[r])
    close(x.grad, gs[r], "reduce bwd", exact=True)

    for dim, scatter in ((2, scatter_to_tensor_parallel_region), (1, scatter_to_sequence_parallel_region)):
        x = leaf(common)
        y = scatter(x, tp=tp) if dim == 2 else scatter(x, 1, tp)
        close(y, shard(common, dim, n, r), f"scatter dim {dim} fwd", exact=True)
        local_gs = [shard(g, dim, n, k) for k, g in enumerate(gs)]  # each rank's grad of its own chunk
        y.backward(local_gs[r])
        close(x.grad, torch.cat(local_gs, dim), f"scatter dim {dim} bwd", exact=True)

    locals_ = [shard(xk, 2, n, k) for k, xk in enumerate(xs)]
    x = leaf(locals_[r])
    y = gather_from_tensor_parallel_region(x, tp)
    close(y, torch.cat(locals_, 2), "gather fwd", exact=True)
    y.backward(common)
    close(x.grad, shard(common, 2, n, r), "gather bwd", exact=True)

    seq_locals = [shard(xk, 1, n, k) for k, xk in enumerate(xs)]
    for seq_dim in (1, -2):  # a negative dim must name the same axis in backward
        x = leaf(seq_locals[r])
        y = gather_from_sequence_parallel_region(x, seq_dim, tp)
        close(y, torch.cat(seq_locals, 1), "sequence gather fwd", exact=True)
        y.backward(gs[r])
        close(x.grad, shard(sum(gs), 1, n, r), "sequence gather bwd (reduce-scatter)")

    x = leaf(seq_locals[r])
    y = gather_from_sequence_parallel_region(x, 1, tp, to_model_parallel=False)
    y.backward(common)
    close(x.grad, shard(common, 1, n, r), "sequence gather bwd (split)", exact=True)

    x = leaf(xs[r])
    y = reduce_scatter_to_sequence_parallel_region(x, 1, tp)
    close(y, shard(sum(xs), 1, n, r), "reduce-scatter fwd")
    seq_gs = [shard(g, 1, n, k) for k, g in enumerate(gs)]
    y.backward(seq_gs[r])
    close(x.grad, torch.cat(seq_gs, 1), "reduce-scatter bwd", exact=True)

    # A backend without reduce_scatter must fall back (all-reduce + slice) to the same result.
    close(collectives.reduce_scatter_fallback(xs[r], 2, tp), shard(sum(xs), 2, n, r), "reduce-scatter fallback")
    native = torch.distributed.reduce_scatter

    def unsupported(*args, **kwargs):
        raise RuntimeError("reduce_scatter is not supported by this backend (simulated)")

    torch.distributed.reduce_scatter = unsupported
    try:
        y = reduce_scatter_to_sequence_parallel_region(xs[r], 1, tp)
        close(y, shard(sum(xs), 1, n, r), "reduce-scatter after the backend refused it")
    finally:
        torch.distributed.reduce_scatter = native
        collectives._NO_REDUCE_SCATTER.clear()
    close(collectives.all_reduce_max(xs[r], tp), torch.stack(xs).amax(0), "all-reduce max", exact=True)


# ------------------------------------------------------------------------------------------------------------ loss
def check_cross_entropy(tp: TensorParallel, three_d: bool) -> None:
    n, r = tp.size, tp.rank
    vocab = 24
    shape = (B, S) if three_d else (B * S,)
    logits = rand(31, *shape, vocab) * 4
    target = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(32))
    target.view(-1)[1] = target.view(-1)[5] = -100
    gl = rand(33, *shape)
    ref_logits = leaf(logits)
    ref = F.cross_entropy(ref_logits.reshape(-1, vocab), target.reshape(-1), reduction="none").view(shape)
    (ref * gl).sum().backward()
    assert float(ref.detach().view(-1)[1]) == 0.0

    local = leaf(shard(logits, -1, n, r))
    loss = parallel_cross_entropy(local, target, tp=tp)
    close(loss, ref, "loss")
    (loss * gl).sum().backward()
    close(local.grad, shard(ref_logits.grad, -1, n, r), "logits grad")


# ------------------------------------------------------------------------------------------------------------- GQA
def check_gqa(
    tp: TensorParallel, H: int, K: int, m: int, fuse: bool, bias: bool, sp: bool = False,
    layout: str = "tiled", accumulate: int = 1,
) -> None:  # fmt: skip
    n, r, hd = tp.size, tp.rank, 4
    Wq, Wk, Wv = rand(41, H * hd, IN), rand(42, K * hd, IN), rand(43, K * hd, IN)
    bq, bk, bv = rand(44, H * hd), rand(45, K * hd), rand(46, K * hd)
    x = rand(47, B, S, IN)
    q_heads = [query_head_indices_for_rank(n, k, H, K, m, layout) for k in range(n)]
    kv_heads = [kv_head_indices_for_rank(n, k, K, m, layout) for k in range(n)]
    # Each rank's replicas get their own output gradient (they serve different query heads).
    gq = [rand(500 + k, B, S, len(q_heads[k]) * hd) for k in range(n)]
    gk = [rand(600 + k, B, S, len(kv_heads[k]) * hd) for k in range(n)]
    gv = [rand(700 + k, B, S, len(kv_heads[k]) * hd) for k in range(n)]

    # Reference: unreplicated projections; a K/V head's output gradient is the sum over its replicas.
    gq_full, gk_full, gv_full = torch.zeros(B, S, H * hd), torch.zeros(B, S, K * hd), torch.zeros(B, S, K * hd)
    for k in range(n):
        for slot, head in enumerate(q_heads[k]):
            gq_full[..., head * hd : (head + 1) * hd] += gq[k][..., slot * hd : (slot + 1) * hd]
        for slot, head in enumerate(kv_heads[k]):
            gk_full[..., head * hd : (head + 1) * hd] += gk[k][..., slot * hd : (slot + 1) * hd]
            gv_full[..., head * hd : (head + 1) * hd] += gv[k][..., slot * hd : (slot + 1) * hd]
    ref = {name: leaf(t) for name, t in dict(x=x, Wq=Wq, Wk=Wk, Wv=Wv, bq=bq, bk=bk, bv=bv).items()}
    qr = F.linear(ref["x"], ref["Wq"], ref["bq"] if bias else None)
    kr = F.linear(ref["x"], ref["Wk"], ref["bk"] if bias else None)
    vr = F.linear(ref["x"], ref["Wv"], ref["bv"] if bias else None)
    ((qr * gq_full).sum() + (kr * gk_full).sum() + (vr * gv_full).sum()).backward()

    layer = GQAQKVColumnParallelLinear(IN, H, K, hd, m, bias, fuse, layout, sp, tp=tp)
    assert layer.kv_head_indices == kv_heads[r] and layer.query_head_indices == q_heads[r]
    local = {
        "weight": (head_rows(Wq, q_heads[r], hd), head_rows(Wk, kv_heads[r], hd), head_rows(Wv, kv_heads[r], hd)),
        "bias": (head_rows(bq, q_heads[r], hd), head_rows(bk, kv_heads[r], hd), head_rows(bv, kv_heads[r], hd)),
    }
    for kind in ("weight", "bias") if bias else ("weight",):
        if fuse:
            load(getattr(layer, f"{kind}_qkv"), torch.cat(local[kind]))
        else:
            for part, value in zip("qkv", local[kind]):
                load(getattr(layer, f"{kind}_{part}"), value)
    for name, param in layer.named_parameters():
        assert param.tensor_model_parallel and param.partition_dim == 0 and param.num_partitions == n, name

    xin = leaf(shard(x, 1, n, r) if sp else x)
    for _ in range(accumulate):  # gradient accumulation: the reduction must apply once per backward
        q, k, v = layer(xin)
        ((q * gq[r]).sum() + (k * gk[r]).sum() + (v * gv[r]).sum()).backward()
    close(q, head_rows(qr.detach(), q_heads[r], hd, dim=-1), "q")
    close(k, head_rows(kr.detach(), kv_heads[r], hd, dim=-1), "k")
    close(v, head_rows(vr.detach(), kv_heads[r], hd, dim=-1), "v")

    sources = {"weight": ("Wq", "Wk", "Wv"), "bias": ("bq", "bk", "bv")}
    heads = (q_heads[r], kv_heads[r], kv_heads[r])
    expected = {
        kind: [head_rows(ref[name].grad, h, hd) for name, h in zip(names, heads)]
        for kind, names in sources.items()
        if kind == "weight" or bias
    }
    for kind in ("weight", "bias") if bias else ("weight",):
        if fuse:
            grads = getattr(layer, f"{kind}_qkv").grad.split([layer.q_size, layer.kv_size, layer.kv_size])
        else:
            grads = [getattr(layer, f"{kind}_{part}").grad for part in "qkv"]
        for part, grad, exp in zip("qkv", grads, expected[kind]):
            close(grad, accumulate * exp, f"{kind}_{part} grad (accumulated x{accumulate})")
    close(xin.grad, accumulate * (shard(ref["x"].grad, 1, n, r) if sp else ref["x"].grad), "input grad")

    if m > 1:
        # Sanity: without the reduction the local K gradient is NOT the reference one, so the check above can fail.
        w = leaf(local["weight"][1])
        raw = torch.autograd.grad((F.linear(x, w) * gk[r]).sum(), w)[0]
        if torch.allclose(raw, expected["weight"][1], rtol=1e-3, atol=1e-3):
            raise AssertionError("unreduced k gradient already equals the reference: this case cannot detect a bug")


# ------------------------------------------------------------------------------------------------------ case table
GQA_CONFIGS = [(8, 2, 1), (8, 2, 2), (8, 8, 1), (4, 1, 2), (4, 1, 4)]  # (H, K, m); kept where the shape is valid


def cases(tp_size: int) -> dict[str, Callable[[TensorParallel], None]]:
    t: dict[str, Callable[[TensorParallel], None]] = {"mappings": check_mappings}
    for bias in (True, False):
        for on in (True, False):  # gather_output for column, input_is_parallel for row
            for sp in (False, True):
                column = partial(check_column, bias=bias, gather_output=on, sp=sp)
                t[f"column[bias={bias:d},gather={on:d},sp={sp:d}]"] = column
                row = partial(check_row, bias=bias, input_is_parallel=on, sp=sp)
                t[f"row[bias={bias:d},input_parallel={on:d},sp={sp:d}]"] = row
    for on in (True, False):
        t[f"column[stride=2,gather={on:d}]"] = partial(check_column, bias=True, gather_output=on, sp=False, stride=2)
    for pad in (None, OUT - 1):
        for sp in (False, True):
            t[f"embedding[padding={pad},sp={sp:d}]"] = partial(check_embedding, padding_idx=pad, sp=sp)
    for three_d in (False, True):
        t[f"cross_entropy[3d={three_d:d}]"] = partial(check_cross_entropy, three_d=three_d)
    for H, K, m in GQA_CONFIGS:
        if gqa_shape_problem(tp_size, H, K, m) is not None:
            continue
        gqa = partial(check_gqa, H=H, K=K, m=m)
        for fuse in (False, True):
            for bias in (False, True):
                t[f"gqa[H={H},K={K},m={m},fuse={fuse:d},bias={bias:d}]"] = partial(gqa, fuse=fuse, bias=bias)
        t[f"gqa[H={H},K={K},m={m},sp=1]"] = partial(gqa, fuse=True, bias=True, sp=True)
        t[f"gqa[H={H},K={K},m={m},interleaved]"] = partial(gqa, fuse=False, bias=True, layout="interleaved")
        t[f"gqa[H={H},K={K},m={m},accumulate=3]"] = partial(gqa, fuse=False, bias=True, accumulate=3)
    return {f"tp{tp_size}/{name}": fn for name, fn in t.items()}


def run_cases(tp: TensorParallel, only: list[str] | None = None) -> dict[str, str | None]:
    """Run every case of ``cases(tp.size)``: name -> None when it passed, else the failure text."""
    results: dict[str, str | None] = {}
    for name, check in cases(tp.size).items():
        if only is not None and name not in only:
            continue
        try:
            check(tp)
            results[name] = None
        except Exception:
            results[name] = traceback.format_exc(limit=-3)
    return results


def distributed_worker(rank: int, world_size: int, tp_sizes: list[int]) -> dict[str, str | None]:
    """Spawned entry point: for each tp size build the groups, check the state, run every case, tear down."""
    results: dict[str, str | None] = {}
    for tp_size in tp_sizes:
        initialize_model_parallel(tp_size)
        try:
            tp = TensorParallel.from_state()
            state = (
                get_tensor_model_parallel_size(), get_tensor_model_parallel_rank(),
                get_data_parallel_size(), get_data_parallel_rank(),
            )  # fmt: skip
            expected = (tp_size, rank % tp_size, world_size // tp_size, rank // tp_size)
            results[f"tp{tp_size}/state"] = None if state == expected else f"state {state} != expected {expected}"
            results.update(run_cases(tp))
        finally:
            destroy_model_parallel()
    bad = world_size - 1 if world_size > 2 else 3  # a size that does not divide the world
    try:
        initialize_model_parallel(bad)
        results[f"world{world_size}/tp{bad}_rejected"] = "no error for a tp size that does not divide the world"
    except ConfigError as err:
        ok = str(bad) in str(err) and str(world_size) in str(err)
        results[f"world{world_size}/tp{bad}_rejected"] = None if ok else f"message does not name both sizes: {err}"
    finally:
        destroy_model_parallel()
    return results
