"""Test oracle: the byte provenance of rebuilt weights found by tracing, independently of the specs' piece maps.

The specs declare their layouts once (`transformations.spec_fields`, piece maps executed by the consolidation
byte copier and by `pieces_torch`). This oracle finds the same answer another way, to check those maps: the
group's rebuild (`to_original_weights`, or `gather_parameter` for a parameter without spec) is run on small
*index* tensors whose elements are the global ids of the rows (or columns) of every saved shard, and the ids found
in each output say where its bytes come from.

- Row provenance (`RowCopy`): each shard ``(d0, ...)`` is replaced by an int64 ``(d0, 2)`` tensor (``(d0,)`` when
  1-D) holding ``id`` and ``id + SHIFT``. An output is row-wise when it comes back as ``(D0, 2)`` with the second
  column still equal to the first plus ``SHIFT`` (no operation mixed the columns) and every id names a row of a
  shard whose trailing shape and dtype are the output's.
- Column provenance (`ColumnGather`): for 2-D outputs that are not row-wise each of their shards is replaced by
  ``(2, d1)`` column ids. Every output row is then the same row of the shards, cut into the same column ranges.

Each derivation runs twice with different id bases and must decode to the same provenance, so a rebuild that does
arithmetic on values, or leaves uninitialized memory in its output, is not mistaken for a data move.
(Moved here from the package, where it planned the torch consolidation engine's byte copies.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from optimum_neuron_peft.errors import OptimumNeuronPeftError
from optimum_neuron_peft.transformations.pieces import ColumnGather, Piece, Provenance, RowCopy

SHIFT = 1 << 44  # second row/column of an index tensor: the first plus this
_BASES = (1 << 20, 1 << 36)  # two id bases; both runs must decode to the same provenance

Rebuild = Callable[[dict[str, list[torch.Tensor]]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class SourceInfo:
    shape: tuple[int, ...]
    dtype: Any  # torch dtype


def derive(
    rebuild: Rebuild,
    sources: Sequence[tuple[str, Sequence[SourceInfo]]],
    outputs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
) -> dict[str, Provenance]:
    """Provenance of the outputs of ``rebuild`` that only move data; the others are left out.

    ``sources``: (saved name, [shape/dtype per rank]) of the group, in group order; ``outputs``: {output name:
    (shape, dtype)} as planned (dtype after any cast: an output whose dtype differs from its sources is left out).
    """
    if any(len(info.shape) == 0 for _, ranks in sources for info in ranks):
        return {}
    # All saved tensors of the group at once, then each alone: a spec rebuilds whatever names it is given, so one
    # tensor whose rebuild cannot run on index tensors does not hide the provenance of the others.
    subsets = [range(len(sources))] + ([[k] for k in range(len(sources))] if len(sources) > 1 else [])
    found: dict[str, Provenance] = {}
    for subset in subsets:
        pending = {n: o for n, o in outputs.items() if n not in found}
        if pending:
            found.update(_consistent(lambda base, reverse: _row_run(rebuild, sources, subset, pending, base, reverse)))
    used = {k for prov in found.values() for k, _, _, _ in prov.pieces}  # saved tensors feeding row-wise outputs
    for subset in subsets:
        pending = {n: o for n, o in outputs.items() if n not in found and len(o[0]) == 2}
        if pending:
            found.update(_consistent(lambda base, reverse: _column_run(rebuild, sources, subset, pending, used, base, reverse)))
    return found


def _consistent(run: Callable[[int, bool], dict[str, Provenance]]) -> dict[str, Provenance]:
    first, second = run(_BASES[0], False), run(_BASES[1], True)
    return {name: prov for name, prov in first.items() if second.get(name) == prov}


def _id_bases(sources: Sequence[tuple[str, Sequence[SourceInfo]]], axis: int, base: int, reverse: bool) -> list[list[int]]:
    """Starting id of every (source, rank) along ``axis``. Each id range is followed by an unused range as long,
    and the second run lays the ranges out in reverse order: a rebuild that shifts or scales ids instead of moving
    them then decodes to out-of-range positions or to a different provenance in the two runs."""
    slots = [(k, r, info) for k, (_, ranks) in enumerate(sources) for r, info in enumerate(ranks)]
    bases = [[0] * len(ranks) for _, ranks in sources]
    next_id = base
    for k, r, info in reversed(slots) if reverse else slots:
        bases[k][r] = next_id
        next_id += 2 * max(_length(info.shape, axis), 1)
    return bases


def _run(rebuild: Rebuild, index: dict[str, list[torch.Tensor]], complete: bool) -> dict[str, torch.Tensor] | None:
    """The rebuild on index tensors, or None when it refuses them: a spec's shape check (`OptimumNeuronPeftError`)
    or torch's (`RuntimeError`), as a column run's mixed row/column ids can trigger, or, when the index holds only
    some of the group's tensors (not ``complete``), a missing one (`LookupError`): not a pure data move in that
    layout. Any other error is a bug in the spec and propagates, never mistaken for "not a data move"."""
    expected = (OptimumNeuronPeftError, RuntimeError) if complete else (OptimumNeuronPeftError, RuntimeError, LookupError)
    try:
        return rebuild(index)
    except expected:
        return None


def _row_run(rebuild, sources, subset, outputs, base, reverse) -> dict[str, Provenance]:
    bases = _id_bases(sources, 0, base, reverse)
    index = {}
    for k in subset:
        (name, ranks), starts = sources[k], bases[k]
        index[name] = [_ids(info.shape[0], start, 2 if len(info.shape) > 1 else 1) for info, start in zip(ranks, starts)]
    result = _run(rebuild, index, complete=len(subset) == len(sources))
    if result is None:
        return {}
    found = {}
    for name, (shape, dtype) in outputs.items():
        ids = _checked_ids(result.get(name), (shape[0], 2) if len(shape) > 1 else (shape[0],), along=1)
        if ids is None:
            continue
        pieces = _pieces(ids, bases, sources, axis=0)
        if pieces is not None and all(
            sources[k][1][r].shape[1:] == shape[1:] and sources[k][1][r].dtype == dtype for k, r, _, _ in pieces
        ):
            found[name] = RowCopy(pieces)
    return found


def _column_run(rebuild, sources, subset, outputs, used, base, reverse) -> dict[str, Provenance]:
    bases = _id_bases(sources, 1, base, reverse)
    index = {}
    for k in subset:
        (name, ranks), starts = sources[k], bases[k]
        tensors = []
        for r, (info, start) in enumerate(zip(ranks, starts)):
            if len(info.shape) == 2 and k not in used:
                tensors.append(_ids(info.shape[1], start, 2).t())  # (2, d1): column ids
            else:  # feeds a row-wise output (or is not 2-D): row ids keep that part of the rebuild valid
                tensors.append(_ids(info.shape[0], start + SHIFT // 2, 2 if len(info.shape) > 1 else 1))
        index[name] = tensors
    result = _run(rebuild, index, complete=len(subset) == len(sources))
    if result is None:
        return {}
    found = {}
    for name, (shape, dtype) in outputs.items():
        tensor = result.get(name)
        ids = _checked_ids(None if tensor is None else tensor.t(), (shape[1], 2), along=1)
        if ids is None:
            continue
        pieces = _pieces(ids, bases, sources, axis=1)
        if pieces is not None and all(
            len(sources[k][1][r].shape) == 2 and sources[k][1][r].shape[0] == shape[0] and (k, r) not in used
            and sources[k][1][r].dtype == dtype
            for k, r, _, _ in pieces
        ):
            found[name] = ColumnGather(pieces)
    return found


def _ids(length: int, start: int, width: int) -> torch.Tensor:
    ids = torch.arange(start, start + length, dtype=torch.int64)
    return ids if width == 1 else torch.stack([ids, ids + SHIFT], dim=1)


def _checked_ids(tensor: torch.Tensor | None, shape: tuple[int, ...], along: int) -> torch.Tensor | None:
    """The first-column ids of an output index tensor, or None when it is not a pure row (column) move."""
    if tensor is None or tensor.dtype != torch.int64 or tuple(tensor.shape) != shape:
        return None
    if len(shape) == 1:
        return tensor
    ids = tensor.select(along, 0)
    return ids if torch.equal(tensor.select(along, 1), ids + SHIFT) else None


def _pieces(ids: torch.Tensor, bases: list[list[int]], sources, axis: int) -> tuple[Piece, ...] | None:
    """Decode ids into (source, rank, first, stop) runs of consecutive positions; None if an id is not valid."""
    if ids.numel() == 0:
        return ()
    flat_bases = sorted((b, k, r) for k, ranks in enumerate(bases) for r, b in enumerate(ranks))
    starts = torch.tensor([b for b, _, _ in flat_bases], dtype=torch.int64)
    which = torch.searchsorted(starts, ids.contiguous(), right=True) - 1
    if bool((which < 0).any()):
        return None
    positions = ids - starts[which]
    lengths = torch.tensor([_length(sources[k][1][r].shape, axis) for _, k, r in flat_bases], dtype=torch.int64)
    if bool((positions >= lengths[which]).any()):
        return None
    breaks = torch.ones(len(ids), dtype=torch.bool)
    breaks[1:] = (which[1:] != which[:-1]) | (positions[1:] != positions[:-1] + 1)
    starts_at = breaks.nonzero().flatten().tolist() + [len(ids)]
    which_l, pos_l = which.tolist(), positions.tolist()
    pieces = []
    for a, b in zip(starts_at[:-1], starts_at[1:]):
        _, k, r = flat_bases[which_l[a]]
        pieces.append((k, r, pos_l[a], pos_l[a] + (b - a)))
    return tuple(pieces)


def _length(shape: tuple[int, ...], axis: int) -> int:
    return shape[axis] if axis < len(shape) else 0
