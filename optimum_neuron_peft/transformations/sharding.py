"""Pure tensor functions that shard full tensors for one tensor-parallel rank and rebuild them from all ranks.

The layout is neuronx-distributed's (docs/checkpoint_formats.md section 2): sharding with stride s along dim d splits the full
tensor into tp * s equal chunks along d and rank r takes chunks r, r + tp, r + 2tp, ... concatenated.

Sources may be real tensors or lazy slices of memory-mapped files (anything with ``.shape`` or ``get_shape()``
that supports basic slicing, such as ``safetensors.safe_open(...).get_slice(name)``), so that a rank reads only
the rows or columns it needs.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import SpecError
from .pieces import merge_blocks, shard_blocks  # the block arithmetic, torch-free

TensorLike = Any  # torch.Tensor, or a lazy slice with .shape / get_shape() and basic slicing


def tensor_shape(t: TensorLike) -> torch.Size:
    if isinstance(t, torch.Tensor):
        return t.shape
    if hasattr(t, "get_shape"):
        return torch.Size(t.get_shape())
    return torch.Size(t.shape)


def narrow(t: TensorLike, dim: int, start: int, length: int) -> torch.Tensor:
    """``t.narrow(dim, start, length)`` that also reads just that span from a lazy slice."""
    if isinstance(t, torch.Tensor):
        return t.narrow(dim, start, length)
    if hasattr(t, "load") and not hasattr(t, "__getitem__"):
        return t.load().narrow(dim, start, length)
    index = (slice(None),) * dim + (slice(start, start + length),)
    return t[index]


def materialize(t: TensorLike) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t
    if hasattr(t, "load"):
        return t.load()
    return t[(slice(None),) * len(tensor_shape(t))]


def take_blocks(t: TensorLike, dim: int, blocks: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Concatenate ``[start, stop)`` blocks of ``t`` along ``dim``; one block is a view where ``t`` allows it."""
    merged = merge_blocks(blocks)
    if len(merged) == 1:
        start, stop = merged[0]
        return narrow(t, dim, start, stop - start).contiguous()
    return gather_blocks([(t, merged)], dim)


def gather_blocks(parts: Sequence[tuple[TensorLike, Sequence[tuple[int, int]]]], dim: int) -> torch.Tensor:
    """One new tensor: the ``[start, stop)`` blocks of each source along ``dim``, in order.

    Along dim 0, when every source can ``read_rows_into(out, start, stop)`` (a file-backed slice such as
    `models.loading.FileSlice`) and they share dtype and trailing dims, the rows are read straight into the
    result: the copy a concatenation makes anyway, without first mapping the source (~20% less CPU for a fused
    gate/up weight, docs/benchmarks.md). Otherwise this is ``torch.cat`` of the blocks.
    """
    runs = [(source, block) for source, blocks in parts for block in merge_blocks(blocks)]
    if not runs:
        raise SpecError("gather_blocks: no blocks given")
    sources = [source for source, _ in parts]
    trailing = {tuple(tensor_shape(s))[1:] for s in sources}
    if dim == 0 and all(hasattr(s, "read_rows_into") for s in sources) and len(trailing) == 1:
        dtypes = {s.dtype for s in sources}
        if len(dtypes) == 1:
            out = torch.empty((sum(stop - start for _, (start, stop) in runs), *trailing.pop()), dtype=dtypes.pop())
            row = 0
            for source, (start, stop) in runs:
                source.read_rows_into(out[row : row + stop - start], start, stop)
                row += stop - start
            return out
    return torch.cat([narrow(source, dim, start, stop - start) for source, (start, stop) in runs], dim=dim)


def _check_rank(tp_size: int, tp_rank: int, what: str) -> None:
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise SpecError(f"{what}: expected 0 <= tp_rank < tp_size, got tp_rank={tp_rank}, tp_size={tp_size}")


def shard_ranges(
    full: TensorLike, partition_dim: int, tp_size: int, tp_rank: int, stride: int = 1, *, name: str = "tensor"
) -> list[tuple[int, int]]:
    """The ``[start, stop)`` ranges of ``full`` along ``partition_dim`` that ``tp_rank`` holds (named errors)."""
    _check_rank(tp_size, tp_rank, name)
    size = tensor_shape(full)[partition_dim]
    try:
        return shard_blocks(size, tp_size, tp_rank, stride)
    except SpecError as e:
        raise SpecError(f"{name}: {e}") from None


def shard_tensor(
    full: TensorLike, partition_dim: int, tp_size: int, tp_rank: int, stride: int = 1, *, name: str = "tensor"
) -> torch.Tensor:
    """The shard of ``full`` that ``tp_rank`` holds (dimension must divide evenly; see the padding variant)."""
    return take_blocks(full, partition_dim, shard_ranges(full, partition_dim, tp_size, tp_rank, stride, name=name))


def unshard_tensors(
    shards: Sequence[torch.Tensor], partition_dim: int, stride: int = 1, *, full_size: int | None = None,
    name: str = "tensor",
) -> torch.Tensor:
    """Inverse of `shard_tensor` over all ranks; ``full_size`` trims the padding added by the padding variant."""
    if not shards:
        raise SpecError(f"{name}: no shards given")
    shapes = {tuple(s.shape) for s in shards}
    if len(shapes) != 1:
        raise SpecError(f"{name}: every rank must hold a shard of the same shape, found shapes {sorted(shapes)}")
    if stride == 1:
        full = torch.cat(list(shards), dim=partition_dim)
    else:
        local = shards[0].shape[partition_dim]
        if local % stride != 0:
            raise SpecError(f"{name}: shard size {local} along dim {partition_dim} is not a multiple of stride {stride}")
        pieces = [s.split(local // stride, dim=partition_dim) for s in shards]
        full = torch.cat([pieces[r][i] for i in range(stride) for r in range(len(shards))], dim=partition_dim)
    if full_size is not None and full_size != full.shape[partition_dim]:
        if full_size > full.shape[partition_dim]:
            raise SpecError(
                f"{name}: expected at least {full_size} entries along dim {partition_dim} after unsharding, "
                f"found {full.shape[partition_dim]}"
            )
        full = full.narrow(partition_dim, 0, full_size)
    return full


def padded_size(size: int, tp_size: int, stride: int = 1) -> int:
    """``size`` rounded up to the next multiple of tp_size * stride."""
    multiple = tp_size * stride
    return -(-size // multiple) * multiple


def create_local_weight_with_padding(
    full_weight: TensorLike, partition_dim: int, stride: int, tp_size: int, tp_rank: int, *, name: str = "weight"
) -> torch.Tensor:
    """Shard of ``full_weight`` for ``tp_rank``, zero-padding ``partition_dim`` to a multiple of tp_size * stride.

    The rank shards of a padded dimension all have ``padded_size(size) / tp_size`` entries; `unshard_tensors`
    with ``full_size=size`` removes the padding again.
    """
    _check_rank(tp_size, tp_rank, name)
    shape = tensor_shape(full_weight)
    size = shape[partition_dim]
    target = padded_size(size, tp_size, stride)
    if target == size:
        return shard_tensor(full_weight, partition_dim, tp_size, tp_rank, stride, name=name)
    full = materialize(full_weight)
    pad_shape = list(shape)
    pad_shape[partition_dim] = target - size
    full = torch.cat([full, full.new_zeros(pad_shape)], dim=partition_dim)
    return shard_tensor(full, partition_dim, tp_size, tp_rank, stride, name=name)


def create_local_fused_weight(
    tp_rank: int,
    tp_size: int,
    individual_weights: Sequence[TensorLike],
    partition_dim: int,
    fuse_axis: int,
    out_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Local weight of several linears fused along ``fuse_axis``: [shard_r(w_0) ; shard_r(w_1) ; ...].

    Each original weight is sharded on its own along ``partition_dim`` (so unequal sizes are fine), then the shards
    are concatenated along ``fuse_axis``. With equal sizes this is strided sharding of the fused weight.
    """
    _check_rank(tp_size, tp_rank, "fused weight")
    local = [shard_tensor(w, partition_dim, tp_size, tp_rank, name=f"fused weight #{i}") for i, w in enumerate(individual_weights)]
    with torch.no_grad():
        return torch.cat(local, dim=fuse_axis, out=out_weight)
