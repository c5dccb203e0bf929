"""The forward layouts of a torch-free plan: for every saved tensor, the output blocks each rank holds.

The plan (`torch_free_plan`) carries the inverse piece maps only: each output read from one copy (rank 0 of a
replicated tensor, replica 0 of a GQA key/value head). `byte_verify` checks every other copy too, from the
forward layouts built here as the planner builds its groups: each spec's ``saved_layouts`` (the declared specs of
the metadata, `declared`), then every saved tensor no spec consumed from its metadata entry
(`declared.parameter_layout`: whole on every rank, or sharded along its partition_dim), for the model and for each
adapter alike (an adapter's layouts name its outputs as saved, without PEFT's wrapper prefix). Pure Python, no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..errors import SpecError
from ..transformations.names import normalize_parameters_metadata
from ..transformations.pieces import Provenance, RowCopy, SavedLayout, Shape
from .declared import Unsupported, parameter_layout
from .detect import source_format_of
from .optimum_neuron import XSER_TENSORS_SUFFIX
from .optimum_neuron import normalize_parameters_metadata as normalize_quirks

if TYPE_CHECKING:
    from .torch_free_plan import ModelPlan, PartPlan, PlannedTensor


def forward_layouts(plan: ModelPlan, planned: PartPlan) -> list[tuple[list[PlannedTensor], list[SavedLayout]]]:
    """(group, the saved layouts of its saved tensors) for every group of the part ``planned`` of ``plan`` (the
    model or one adapter); `Unsupported` cannot happen for a plan the planner made (it built these layouts), so it
    is raised as is, as a plan bug."""
    from .torch_free_plan import declared_specs_of  # the planner's reading of the specs, not a second one

    part = plan.source_of(planned)
    stage_of: dict[Path, int] = {}
    for (tp, pp), path in part.rank_files.items():
        stage_of[path] = stage_of[Path(f"{path}{XSER_TENSORS_SUFFIX}")] = pp
    stages: dict[int, tuple[list, dict]] = {}
    out = []
    for group in (g for g in planned.groups if g):  # an adapter's group may keep no output (`adapter_targets`)
        sources = group[0].sources
        file = sources[0][0].file
        pp = stage_of[file] if file in stage_of else stage_of[file.parent]
        if pp not in stages:
            metadata = part.metadata[pp]
            if source_format_of(plan.checkpoint) == "optimum-neuron":
                metadata = normalize_quirks(metadata, part.tp_size)
            parameters = normalize_parameters_metadata(metadata["parameters"], part.adapter_name)
            stages[pp] = (declared_specs_of(metadata, part.tp_size), parameters)
        modules, parameters = stages[pp]
        names = [ranks[0].name for ranks in sources]
        shapes = {ranks[0].name: tuple(ranks[0].shape) for ranks in sources}
        out.append((group, _group_layouts(names, shapes, modules, parameters, part.tp_size)))
    return out


def _group_layouts(names: Sequence[str], shapes: dict[str, Shape], modules, parameters, tp_size: int) -> list[SavedLayout]:
    """As `declared.group_outputs` lays a group out: its module's specs, then each unconsumed name's entry."""
    layouts: list[SavedLayout] = []
    for module, specs in modules:
        if any(names[0] in spec.relevant_names(module) for spec in specs):
            for spec in specs:
                relevant = spec.relevant_names(module)
                try:
                    layouts += spec.saved_layouts(module, {n: [shapes[n]] * tp_size for n in names if n in relevant})
                except SpecError as err:
                    raise Unsupported(str(err)) from None
            break
    consumed = {layout.name for layout in layouts}
    return layouts + [parameter_layout(n, shapes[n], parameters[n], tp_size) for n in names if n not in consumed]


def read_by_plan(provenance: Provenance, k: int, r: int, first: int, stop: int, shape: Sequence[int]) -> bool:
    """Whether positions [first, stop) of saved tensor k on rank r (rows of a row layout, columns of a column one)
    are what ``provenance`` reads, so the plan's own comparison covered them."""
    for pk, pr, a, b in provenance.pieces:
        if (pk, pr) != (k, r):
            continue
        if isinstance(provenance, RowCopy) and (a, b) == (0, shape[0]):
            return True  # the whole saved tensor (a column layout read as rows when it is one shard's every column)
        if a <= first and stop <= b:
            return True
    return False
