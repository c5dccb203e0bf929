"""Reading the specs' layouts from a checkpoint's metadata and planning one group's byte moves, without torch.

Each spec's layout is written once, as a piece map (`transformations.spec_fields`: ``saved_layouts``, inverted by
`transformations.pieces.original_layouts` into one `RowCopy` / `ColumnGather` per rebuilt weight). Here the
specs' serialized fields (as the metadata file holds them) become those field classes, checked at least as
strictly as the specs' ``from_dict`` / ``__post_init__``, and each group of saved tensors is planned from them and
the saved shapes: the weights `transformations.model.to_original_weights` rebuilds, in its order, with where
their bytes are. Parameters no spec covers are laid out from their metadata entry (`parameter_output`).

Both consolidation engines plan with these: the torch-free one from the metadata's fields (`DECLARED_SPECS`), the
torch one from its spec objects (they carry the same ``saved_layouts``). Anything a layout does not accept raises
`Unsupported`. Tests check the piece maps against the specs' own results and against index-tensor tracing
(tests/checkpoint/provenance_oracle.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

from ..errors import SpecError
from ..transformations.pieces import OriginalLayout, SavedLayout, Shape, original_layouts, replicated, sharded
from ..transformations.names import SUPPORTED_PEFT_TYPES
from ..transformations.spec_fields import FUSE_AXES, FusedLinearsFields, GQAQKVFields



class Unsupported(Exception):
    """The torch-free engine cannot vouch for this checkpoint; the torch engine takes it (and reports errors)."""


Output = OriginalLayout  # one rebuilt weight: name, shape, source index in the group, provenance


@dataclass(frozen=True)
class GroupShapes:
    """The saved tensors of one group: names in group order (a piece's source index is a position here) and the
    shape every rank holds (ranks agree, checked when the files were opened)."""

    names: Sequence[str]
    shapes: Mapping[str, Shape]
    tp_size: int

    def index(self, name: str) -> int:
        return self.names.index(name)

    def shape(self, name: str) -> Shape:
        shape = self.shapes[name]
        if not shape or 0 in shape:
            raise Unsupported(f"{name}: {'scalar' if not shape else 'empty'} tensor")
        return shape


class LaidOutSpec(Protocol):
    """A spec with a piece map: a spec object, or a declared layout below."""

    tp_size: int

    def get_relevant_parameter_names(self, module_fully_qualified_name: str) -> set[str]: ...

    def saved_layouts(self, module_fully_qualified_name: str, shapes: Mapping[str, Sequence[Shape]]) -> list[SavedLayout]: ...


def spec_outputs(spec: LaidOutSpec, module: str, group: GroupShapes) -> tuple[list[Output], list[str]]:
    """(the weights the spec's ``to_original_weights`` rebuilds from ``group``, in its order; the names it
    consumes), from its piece map; `Unsupported` where the map refuses the shapes."""
    relevant = spec.get_relevant_parameter_names(module)
    shapes = {n: [group.shape(n)] * group.tp_size for n in group.names if n in relevant}
    try:
        layouts = spec.saved_layouts(module, shapes)
        outputs = original_layouts(layouts, {n: shape[0] for n, shape in shapes.items()}, group.names)
    except SpecError as err:
        raise Unsupported(str(err)) from None
    return outputs, list(dict.fromkeys(layout.name for layout in layouts))


class DeclaredLayout:
    """Base of the declared layouts: a spec's field class (`transformations.spec_fields`, its fields, claimed
    names and piece map) read from metadata. Like those classes, not frozen (a frozen dataclass may not inherit a
    non-frozen one); built once from a checkpoint's metadata and only read."""

    spec_name: str  # the spec class name the metadata uses

    def relevant_names(self, module: str) -> set[str]:
        return self.get_relevant_parameter_names(module)  # type: ignore[attr-defined]

    @classmethod
    def from_fields(cls, data: Any) -> "DeclaredLayout":
        """The layout of serialized fields that are all str, int or bool (`_fields`, then ``field_problem``)."""
        layout = cls(**_fields(data, *_declared_kinds(cls), cls.spec_name))
        problem = layout.field_problem()  # type: ignore[attr-defined]
        if problem is not None:
            raise Unsupported(f"{cls.spec_name}: {problem}")
        return layout

    def outputs(self, module: str, group: GroupShapes) -> tuple[list[Output], list[str]]:
        return spec_outputs(self, module, group)  # type: ignore[arg-type]


DeclaredSpec = DeclaredLayout  # the name `torch_free_plan` uses


# ---------------------------------------------------------------------------------------------------------------------
# Field checks (as strict as the specs' own, or stricter: stricter only sends a checkpoint to the torch engine)


def _fields(data: Any, required: Mapping[str, type], optional: Mapping[str, tuple[type, Any]], where: str) -> dict[str, Any]:
    """The fields of a serialized spec, each of exactly its type (no conversion, bool is not int), ``peft_type``
    dropped; `Unsupported` for a missing, unknown or mistyped field, or a PEFT type the specs refuse."""
    if not isinstance(data, Mapping):
        raise Unsupported(f"{where}: fields are not a mapping")
    data = dict(data)
    peft_type = data.pop("peft_type", None)
    if peft_type is not None and (not isinstance(peft_type, str) or peft_type.lower() not in SUPPORTED_PEFT_TYPES):
        raise Unsupported(f"{where}: peft_type {peft_type!r}")
    kinds = {**required, **{key: kind for key, (kind, _) in optional.items()}}
    if set(required) - set(data) or set(data) - set(kinds):
        raise Unsupported(f"{where}: fields {sorted(data)}, expected {sorted(required)} and optionally {sorted(optional)}")
    for key, value in data.items():
        if type(value) is not kinds[key]:
            raise Unsupported(f"{where}: field {key!r} is {value!r}")
    return {**{key: default for key, (_, default) in optional.items()}, **data}


def _declared_kinds(field_class: type) -> tuple[dict[str, type], dict[str, tuple[type, Any]]]:
    """The (required, optional) arguments of `_fields` for a field class whose fields are all str, int or bool."""
    kinds = {"str": str, "int": int, "bool": bool}
    required: dict[str, type] = {}
    optional: dict[str, tuple[type, Any]] = {}
    for f in dataclasses.fields(field_class):
        kind = f.type if isinstance(f.type, type) else kinds[f.type]
        if f.default is dataclasses.MISSING:
            required[f.name] = kind
        else:
            optional[f.name] = (kind, f.default)
    return required, optional


# ---------------------------------------------------------------------------------------------------------------------
# The built-in specs (`transformations.gqa_qkv`, `transformations.fused_linears`): their field classes, read from metadata


@dataclass
class DeclaredGQAQKV(GQAQKVFields, DeclaredLayout):
    spec_name = "GQAQKVColumnParallelLinearSpec"


@dataclass
class DeclaredFusedLinears(FusedLinearsFields, DeclaredLayout):
    spec_name = "FusedLinearsSpec"

    @classmethod
    def from_fields(cls, data: Any) -> "DeclaredFusedLinears":
        where = "FusedLinearsSpec"
        required = {"fused_linear_name": str, "linear_names": list, "bias": bool, "original_dims": list, "tp_size": int}
        fuse_axis = data.get("fuse_axis") if isinstance(data, Mapping) else None
        if type(fuse_axis) not in (int, str) or fuse_axis not in FUSE_AXES:
            raise Unsupported(f"{where}: fuse_axis {fuse_axis!r}")
        fields = _fields({k: v for k, v in data.items() if k != "fuse_axis"}, required, {}, where)
        names, dims, tp = fields["linear_names"], fields["original_dims"], fields["tp_size"]
        if not names or len(names) != len(dims) or tp < 1 or not all(type(n) is str for n in names):
            raise Unsupported(f"{where}: linear_names {names!r} / original_dims {dims!r}")
        if not all(type(d) is int and d % tp == 0 for d in dims):
            raise Unsupported(f"{where}: original_dims {dims!r} over tp_size={tp}")
        spec = cls(fields["fused_linear_name"], tuple(names), fields["bias"], FUSE_AXES[fuse_axis], tuple(dims), tp)
        problem = spec.field_problem()
        if problem is not None:
            raise Unsupported(f"{where}: {problem}")
        return spec


# Spec class name (as registered in `transformations.base.SPEC_REGISTRY` and written in metadata) -> its layout.
DECLARED_SPECS: dict[str, Callable[[Any], DeclaredSpec]] = {
    "GQAQKVColumnParallelLinearSpec": DeclaredGQAQKV.from_fields,
    "FusedLinearsSpec": DeclaredFusedLinears.from_fields,
}


def declared_spec(class_name: Any, fields: Any) -> DeclaredSpec:
    factory = DECLARED_SPECS.get(class_name) if isinstance(class_name, str) else None
    if factory is None:
        raise Unsupported(f"spec class {class_name!r} has no declared layout")
    return factory(fields)


# ---------------------------------------------------------------------------------------------------------------------
# Parameters no spec covers (`transformations.model.gather_parameter`)


def check_parameter_entry(name: str, entry: Any, tp_size: int) -> None:
    """A metadata entry the torch engine would accept and that the torch-free engine understands."""
    if not isinstance(entry, Mapping) or type(entry.get("tensor_model_parallel")) is not bool:
        raise Unsupported(f"{name}: parameter entry {entry!r}")
    if entry["tensor_model_parallel"]:
        dim, stride, parts = entry.get("partition_dim"), entry.get("partition_stride"), entry.get("num_partitions")
        if type(dim) is not int or dim not in (0, 1) or type(stride) is not int or stride < 1 or parts != tp_size or type(parts) is not int:
            raise Unsupported(f"{name}: parameter entry {entry!r}")


def parameter_layout(name: str, shape: Shape, entry: Mapping[str, Any], tp_size: int) -> SavedLayout:
    """Replicated: whole on every rank (rank 0's copy is read back). Sharded along dim d with stride s: each
    rank's shard cut in s chunks, chunk j of every rank in turn (`sharding.unshard_tensors`)."""
    check_parameter_entry(name, entry, tp_size)
    if not entry["tensor_model_parallel"]:
        return replicated(name, name, shape[0], tp_size)
    dim, stride = entry["partition_dim"], entry["partition_stride"]
    if dim >= len(shape) or shape[dim] % stride:
        raise Unsupported(f"{name}: {shape} cannot be split along dim {dim} in {stride}")
    return sharded(name, name, shape[dim] * tp_size, tp_size, dim, stride)


def parameter_output(name: str, group: GroupShapes, entry: Mapping[str, Any]) -> Output:
    shape = group.shape(name)
    try:
        (output,) = original_layouts([parameter_layout(name, shape, entry, group.tp_size)], {name: shape}, group.names)
    except SpecError as err:
        raise Unsupported(str(err)) from None
    return output


def group_outputs(
    module: str | None, specs: Sequence[LaidOutSpec], group: GroupShapes, parameters: Mapping[str, Mapping[str, Any]]
) -> list[Output]:
    """What `transformations.model.to_original_weights` rebuilds from one group, in its order: each spec's
    outputs, then every saved tensor no spec consumed, as a parameter."""
    outputs: list[Output] = []
    consumed: set[str] = set()
    for spec in specs:
        if not hasattr(spec, "saved_layouts"):
            raise Unsupported(f"{type(spec).__name__} has no piece map")
        found, spec_consumed = spec_outputs(spec, module, group)  # type: ignore[arg-type]
        outputs += found
        consumed.update(spec_consumed)
    for name in group.names:
        if name not in consumed:
            if name not in parameters:
                raise Unsupported(f"{name}: saved tensor without parameter entry")
            outputs.append(parameter_output(name, group, parameters[name]))
    if len({o.name for o in outputs}) != len(outputs):
        raise Unsupported(f"{module}: a weight is rebuilt twice")
    return outputs
