"""Piece maps: where every row (or column) of every saved shard comes from in the original weights, and back.

Every weight transformation spec only moves data (concatenations, head-block selections, splits, replica picks).
A spec therefore describes its layout once, as data: for each saved tensor, a `SavedLayout` saying which blocks
of which original tensors each tp rank holds, concatenated along one axis. Every direction is executed from it:

- original -> shards: each rank's saved tensor is its blocks, gathered (`pieces_torch.gather_saved`);
- shards -> original: `original_layouts` inverts the saved layouts into one `RowCopy` or `ColumnGather` per
  original tensor (the first rank holding each position wins: replica 0 of a replicated head, rank 0 of a
  replicated tensor), executed on tensors (`pieces_torch.rebuild_originals`) or as file byte ranges by the
  consolidation byte copier (`checkpoint.byte_copy`).

Pure Python, no torch: the torch-free consolidation plans with these types.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..errors import SpecError

Piece = tuple[int, int, int, int]  # (source index, tp rank, first, stop): rows for RowCopy, columns for ColumnGather
Shape = tuple[int, ...]


@dataclass(frozen=True)
class RowCopy:
    """The output is rows [first, stop) of each piece's shard, concatenated along dim 0 in this order."""

    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class ColumnGather:
    """A 2-D output whose every row ``i`` is, in this order, columns [first, stop) of row ``i`` of each piece's shard."""

    pieces: tuple[Piece, ...]


Provenance = RowCopy | ColumnGather


@dataclass(frozen=True)
class Block:
    """Positions [start, stop) of the original tensor ``original`` along the layout's axis."""

    original: str
    start: int
    stop: int


@dataclass(frozen=True)
class SavedLayout:
    """One saved tensor: on rank r, the concatenation along ``axis`` of the blocks ``ranks[r]``.

    Several layouts may name the same saved tensor (optimum-neuron's shared LoRA A is every projection's lora_A).
    """

    name: str
    axis: int
    ranks: tuple[tuple[Block, ...], ...]


@dataclass(frozen=True)
class OriginalLayout:
    """One original tensor rebuilt from the saved tensors of a group: its name, shape, the index (in the group) of
    the saved tensor its bytes and dtype come from, and where in that tensor's rank shards the bytes are."""

    name: str
    shape: Shape
    source: int
    provenance: Provenance


# ---------------------------------------------------------------------------------------------------------------------
# Building layouts


def merge_blocks(blocks: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``[start, stop)`` blocks with adjacent ones merged, so each run is one read."""
    merged: list[list[int]] = []
    for start, stop in blocks:
        if merged and merged[-1][1] == start:
            merged[-1][1] = stop
        else:
            merged.append([start, stop])
    return [(start, stop) for start, stop in merged]


def shard_blocks(full_size: int, tp_size: int, tp_rank: int, stride: int = 1) -> list[tuple[int, int]]:
    """The ``[start, stop)`` ranges of a dimension of ``full_size`` that ``tp_rank`` holds with ``stride``
    (neuronx-distributed: the dimension cut in tp * stride chunks, rank r holds chunks r, r + tp, ...)."""
    chunks = tp_size * stride
    if full_size % chunks != 0:
        raise SpecError(
            f"cannot shard a dimension of size {full_size} over tp_size={tp_size} with stride={stride}: "
            f"the size must be a multiple of tp_size * stride = {chunks}"
        )
    chunk = full_size // chunks
    return [((tp_rank + i * tp_size) * chunk, (tp_rank + i * tp_size + 1) * chunk) for i in range(stride)]


def blocks_of(original: str, ranges: Sequence[tuple[int, int]]) -> tuple[Block, ...]:
    return tuple(Block(original, start, stop) for start, stop in ranges)


def sharded(name: str, original: str, full_size: int, tp_size: int, axis: int, stride: int = 1) -> SavedLayout:
    """``original`` sharded along ``axis`` over ``tp_size`` ranks with ``stride``, saved as ``name``."""
    return SavedLayout(
        name, axis, tuple(blocks_of(original, shard_blocks(full_size, tp_size, r, stride)) for r in range(tp_size))
    )


def replicated(name: str, original: str, size: int, tp_size: int) -> SavedLayout:
    """``original`` (``size`` rows) whole on every rank, saved as ``name``."""
    return SavedLayout(name, 0, ((Block(original, 0, size),),) * tp_size)


def rank_shapes(shapes: Mapping[str, Sequence[Shape]], name: str, tp_size: int) -> Sequence[Shape]:
    """The per-rank shapes of saved tensor ``name``, checked to come from exactly ``tp_size`` ranks."""
    ranks = shapes[name]
    if len(ranks) != tp_size:
        raise SpecError(f"{name}: expected one tensor per rank for tp_size={tp_size}, found {len(ranks)}")
    return ranks


# ---------------------------------------------------------------------------------------------------------------------
# Inverting layouts: shards -> original


def _merged(pieces: Sequence[Piece]) -> tuple[Piece, ...]:
    """Adjacent pieces of the same shard that continue each other, as one."""
    out: list[list[int]] = []
    for k, r, first, stop in pieces:
        if out and out[-1][0] == k and out[-1][1] == r and out[-1][3] == first:
            out[-1][3] = stop
        else:
            out.append([k, r, first, stop])
    return tuple(tuple(p) for p in out)  # type: ignore[misc]


def _uncovered(covered: list[tuple[int, int]], start: int, stop: int) -> list[tuple[int, int]]:
    """The parts of [start, stop) outside the (sorted, disjoint) ``covered`` ranges."""
    gaps, at = [], start
    for a, b in covered:
        if b <= at or a >= stop:
            continue
        if a > at:
            gaps.append((at, a))
        at = max(at, b)
    if at < stop:
        gaps.append((at, stop))
    return gaps


def original_layouts(
    layouts: Sequence[SavedLayout], shapes: Mapping[str, Shape], names: Sequence[str]
) -> list[OriginalLayout]:
    """The original tensors the saved ``layouts`` rebuild, in order of first appearance.

    ``shapes``: rank 0's shape of each saved tensor; ``names``: the group's saved names (a piece's source index is
    a position here). Each original position is read from the first rank (in layout order, then rank order) that
    holds it. A `SpecError` when an original is not covered from 0 to its end, or comes from two saved tensors.
    """
    index = {name: k for k, name in enumerate(names)}
    found: dict[str, dict] = {}  # original -> {source, axis, shape, segments [(start, stop, rank, first)]}
    for layout in layouts:
        k, shape = index[layout.name], tuple(shapes[layout.name])
        if layout.axis >= len(shape):
            raise SpecError(f"{layout.name}: a {len(shape)}-D tensor laid out along dim {layout.axis}")
        for r, blocks in enumerate(layout.ranks):
            at = 0
            for block in blocks:
                entry = found.setdefault(
                    block.original, {"source": k, "axis": layout.axis, "shape": shape, "segments": []}
                )
                if (entry["source"], entry["axis"]) != (k, layout.axis):
                    raise SpecError(f"{block.original}: laid out by two saved tensors ({names[entry['source']]}, {layout.name})")
                covered = sorted((a, b) for a, b, _, _ in entry["segments"])
                for a, b in _uncovered(covered, block.start, block.stop):
                    entry["segments"].append((a, b, r, at + a - block.start))
                at += block.stop - block.start
    out = []
    for original, entry in found.items():
        segments = sorted(entry["segments"])
        position = 0
        for a, b, _, _ in segments:
            if a != position:
                break
            position = b
        if position != segments[-1][1] or segments[0][0] != 0:
            raise SpecError(f"{original}: positions {position}.. are held by no rank")
        k, axis, shape = entry["source"], entry["axis"], entry["shape"]
        pieces = _merged([(k, r, first, first + b - a) for a, b, r, first in segments])
        out_shape = tuple(position if d == axis else n for d, n in enumerate(shape))
        if axis == 0:
            provenance: Provenance = RowCopy(pieces)
        elif len(shape) != 2:
            raise SpecError(f"{original}: a column gather of a {len(shape)}-D tensor")
        elif len(pieces) == 1 and pieces[0][2:] == (0, shape[1]):  # every column of one shard: its rows
            provenance = RowCopy(((k, pieces[0][1], 0, shape[0]),))
        else:
            provenance = ColumnGather(pieces)
        out.append(OriginalLayout(original, out_shape, k, provenance))
    return out


def row_bytes(shape: Sequence[int], itemsize: int) -> int:
    """Bytes of one dim-0 row of a tensor of ``shape`` (the whole tensor's element size when 1-D)."""
    return math.prod(shape[1:]) * itemsize
