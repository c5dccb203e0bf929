"""The torch executor of piece maps (`pieces`): original tensors -> one rank's saved tensor, and back.

The byte executor of the same maps is `checkpoint.byte_copy` (file byte ranges instead of tensors).
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence

import torch

from .pieces import ColumnGather, OriginalLayout, SavedLayout, Shape, merge_blocks, original_layouts
from .sharding import gather_blocks, take_blocks


def gather_saved(layout: SavedLayout, tp_rank: int, originals: Mapping[str, Any]) -> torch.Tensor:
    """Rank ``tp_rank``'s saved tensor of ``layout``: its blocks of ``originals`` (tensors or lazy slices)."""
    parts: list[tuple[Any, list[tuple[int, int]]]] = []
    for block in layout.ranks[tp_rank]:
        if parts and parts[-1][0] is originals[block.original]:
            parts[-1][1].append((block.start, block.stop))
        else:
            parts.append((originals[block.original], [(block.start, block.stop)]))
    if len(parts) == 1:  # one source: a view where the blocks are one run
        return take_blocks(parts[0][0], layout.axis, parts[0][1])
    return gather_blocks([(source, merge_blocks(blocks)) for source, blocks in parts], layout.axis)


def rebuild_originals(
    layouts: Sequence[OriginalLayout], names: Sequence[str], shards: Mapping[str, Sequence[torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """{original name: tensor} from {saved name: [tensor per rank]}; ``names``: the saved names the layouts' source
    indices refer to. Every output is a new tensor (never a view of a shard: two outputs may read one shard)."""
    out = {}
    for layout in layouts:
        dim = 1 if isinstance(layout.provenance, ColumnGather) else 0
        parts = [shards[names[k]][r].narrow(dim, first, stop - first) for k, r, first, stop in layout.provenance.pieces]
        out[layout.name] = torch.cat(parts, dim=dim) if parts else shards[names[layout.source]][0].new_empty(layout.shape)
    return out


class LaidOut(Protocol):
    """A spec with a piece map (`spec_fields`)."""

    def get_relevant_parameter_names(self, module_fully_qualified_name: str) -> set[str]: ...

    def saved_layouts(self, module_fully_qualified_name: str, shapes: Mapping[str, Sequence[Shape]]) -> list[SavedLayout]: ...


def spec_to_original(
    spec: LaidOut, module_fully_qualified_name: str, shards: Mapping[str, Sequence[torch.Tensor]]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A spec's ``to_original_weights``: its saved layouts, inverted and executed on the shards given.
    Returns (original weights, saved names consumed)."""
    relevant = spec.get_relevant_parameter_names(module_fully_qualified_name)
    shapes = {n: [tuple(t.shape) for t in ranks] for n, ranks in shards.items() if n in relevant}
    layouts = spec.saved_layouts(module_fully_qualified_name, shapes)
    names = list(dict.fromkeys(layout.name for layout in layouts))
    originals = original_layouts(layouts, {n: shapes[n][0] for n in names}, names)
    return rebuild_originals(originals, names, shards), names
