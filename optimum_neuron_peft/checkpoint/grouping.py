"""The saved tensors of a pipeline stage, grouped into the units that are rebuilt together, and the check that
every tensor-parallel rank holds the same tensors. Torch-free: the torch path (`source`) and the torch-free path
(`torch_free_plan`) group alike, so they write tensors in the same order.

A *group* is the saved tensors one module's specs touch (e.g. q/k/v and o_proj of one attention block), or one
parameter no spec covers. Groups are ordered by the rank file's order of their first tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..errors import CheckpointError


@dataclass
class Group:
    specs: list[Any]  # zero or one: the module's specs (`ModelWeightTransformationSpecs`, or its declared layouts)
    names: list[str]  # saved names, in rank-file order


def check_ranks_agree(rank_files: Sequence[Path], tensors: Sequence[Mapping[str, Any]]) -> None:
    """Every rank holds the same names with the same shape and dtype (values: lazy or stored tensors)."""
    first = tensors[0]
    if not first:
        raise CheckpointError(f"{rank_files[0]}: holds no tensors")
    for path, other in zip(rank_files[1:], tensors[1:]):
        if set(other) != set(first):
            missing = sorted(set(first) - set(other))
            extra = sorted(set(other) - set(first))
            detail = f"missing {missing[:3]}" if missing else f"extra {extra[:3]}"
            raise CheckpointError(f"{path}: holds different tensors than {rank_files[0].name} ({detail})")
        for name, lazy in other.items():
            ref = first[name]
            if lazy.shape != ref.shape or lazy.dtype != ref.dtype:
                raise CheckpointError(
                    f"{path}: tensor '{name}' is {tuple(lazy.shape)} {lazy.dtype}, but {rank_files[0].name} holds "
                    f"{tuple(ref.shape)} {ref.dtype} (every rank must hold shards of the same shape)"
                )


def group_tensors(
    names: Iterable[str],
    claims: Iterable[tuple[str, set[str], Any]],
    parameters: Mapping[str, Any],
    metadata_file: Path,
    rank_file: Path,
) -> list[Group]:
    """Groups of the saved ``names`` (rank-file order). ``claims``: (module name, the names its specs touch, the
    specs) per module; a name claimed by two modules, or neither claimed nor in ``parameters``, is an error."""
    order = {name: i for i, name in enumerate(names)}
    claimed: dict[str, str] = {}
    groups = []
    for module, relevant, specs in claims:
        group_names = sorted(relevant & order.keys(), key=order.__getitem__)
        for name in group_names:
            if name in claimed:
                raise CheckpointError(
                    f"{metadata_file}: tensor '{name}' is claimed by the specs of both {claimed[name]} and {module}"
                )
            claimed[name] = module
        if group_names:
            groups.append(Group([specs], group_names))
    for name in order:
        if name in claimed:
            continue
        if name not in parameters:
            raise CheckpointError(f"{metadata_file}: no entry for tensor '{name}' saved in {rank_file.name}")
        groups.append(Group([], [name]))
    groups.sort(key=lambda g: order[g.names[0]])
    return groups
