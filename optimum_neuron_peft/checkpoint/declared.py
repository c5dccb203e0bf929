"""Byte provenance declared from spec fields and shapes: the torch-free twin of `provenance.derive`.

`provenance.derive` finds where each rebuilt weight's bytes come from by running the spec's `to_original_weights`
on index tensors (torch). Here the same `RowCopy` / `ColumnGather` answers are computed from the spec's serialized
fields (as the metadata file holds them) and the saved shapes, in pure Python, so that a full-model consolidation
can plan without importing torch. One layout class per spec class, registered by the name the metadata uses for
the spec (`DECLARED_SPECS`), plus the layout of parameters no spec covers (`parameter_output`).

Each layout accepts only what it fully understands: fields are checked at least as strictly as the spec's
``from_dict`` / ``__post_init__``, shapes as strictly as its ``to_original_weights``; anything else raises
`Unsupported`, and the caller leaves the checkpoint to the torch engine (which reports real errors). Tests check
these layouts against `derive` and the specs' ``get_relevant_parameter_names`` over a grid of configurations, so
the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

from ..transformations.gqa_layout import KV_LAYOUTS, gqa_shape_problem, kv_replicas_for_rank, query_head_indices_for_rank
from ..transformations.names import SUPPORTED_PEFT_TYPES, is_lora_parameter
from ..transformations.spec_fields import FUSE_AXES, QKV, FusedLinearsFields, GQAQKVFields
from .provenance import ColumnGather, Piece, Provenance, RowCopy

Shape = tuple[int, ...]


class Unsupported(Exception):
    """The torch-free engine cannot vouch for this checkpoint; the torch engine takes it (and reports errors)."""


@dataclass(frozen=True)
class Output:
    """One rebuilt weight: its name, shape, the index (in the group) of the saved tensor its bytes and dtype come
    from, and where in that tensor's rank shards the bytes are."""

    name: str
    shape: Shape
    source: int
    provenance: Provenance


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


class DeclaredSpec(Protocol):
    tp_size: int

    def relevant_names(self, module: str) -> set[str]:
        """What the spec's ``get_relevant_parameter_names`` returns (the names its module's group claims)."""

    def outputs(self, module: str, group: GroupShapes) -> tuple[list[Output], list[str]]:
        """(the weights its ``to_original_weights`` rebuilds from ``group``, in its order; the names it consumes)."""


class _Layout:
    """Base of the declared layouts. Each takes its fields, and the names its spec claims
    (``get_relevant_parameter_names``), from the spec's field class in `transformations.spec_fields`. Like those
    classes, the layouts are not frozen: a frozen dataclass may not inherit a non-frozen one. They are built once
    from a checkpoint's metadata and only read."""

    def relevant_names(self, module: str) -> set[str]:
        return self.get_relevant_parameter_names(module)  # type: ignore[attr-defined]


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


def _merged(pieces: Sequence[Piece]) -> tuple[Piece, ...]:
    """Adjacent pieces of the same shard that continue each other, as one (the form `derive` decodes to)."""
    out: list[list[int]] = []
    for k, r, first, stop in pieces:
        if out and out[-1][0] == k and out[-1][1] == r and out[-1][3] == first:
            out[-1][3] = stop
        else:
            out.append([k, r, first, stop])
    return tuple(tuple(p) for p in out)  # type: ignore[misc]


def _rows(pieces: Sequence[Piece]) -> RowCopy:
    return RowCopy(_merged(pieces))


def _columns(pieces: Sequence[Piece], shape: Shape, name: str, source_shape: Shape) -> Provenance:
    """A column gather; one that takes every column of one shard (tp = 1) is that shard's rows, copied as such."""
    if len(shape) != 2:
        raise Unsupported(f"{name}: a column gather of a {len(shape)}-D tensor")
    merged = _merged(pieces)
    if len(merged) == 1 and merged[0][2:] == (0, source_shape[1]):
        k, r, _, _ = merged[0]
        return RowCopy(((k, r, 0, source_shape[0]),))
    return ColumnGather(merged)


def _check_no_lora(group: GroupShapes, relevant: set[str]) -> None:
    lora = [n for n in group.names if n in relevant and is_lora_parameter(n)]
    if lora:
        raise Unsupported(f"{lora[0]}: LoRA tensors are left to the torch engine")


# ---------------------------------------------------------------------------------------------------------------------
# GQAQKVColumnParallelLinearSpec (transformations/gqa_qkv.py)


@dataclass
class DeclaredGQAQKV(GQAQKVFields, _Layout):
    @classmethod
    def from_fields(cls, data: Any) -> "DeclaredGQAQKV":
        where = "GQAQKVColumnParallelLinearSpec"
        spec = cls(**_fields(data, *_declared_kinds(GQAQKVFields), where))
        problem = gqa_shape_problem(spec.tp_size, spec.num_attention_heads, spec.num_key_value_heads, spec.kv_size_multiplier)
        if problem is not None or spec.kv_layout not in KV_LAYOUTS:
            raise Unsupported(f"{where}: {problem or spec.kv_layout}")
        q_total = spec.q_output_size_per_partition * spec.tp_size
        expected_kv = spec.num_key_value_heads * spec.kv_size_multiplier * spec.head_dim // spec.tp_size
        if q_total % spec.num_attention_heads or spec.kv_output_size_per_partition != expected_kv:
            raise Unsupported(f"{where}: partition sizes disagree with the head counts")
        return spec

    def _query_slots(self) -> list[tuple[int, int]]:
        """(rank, local slot) holding each original query head, in head order."""
        where = {}
        for rank in range(self.tp_size):
            heads = query_head_indices_for_rank(
                self.tp_size, rank, self.num_attention_heads, self.num_key_value_heads, self.kv_size_multiplier, self.kv_layout
            )
            where.update({head: (rank, slot) for slot, head in enumerate(heads)})
        return [where[h] for h in range(self.num_attention_heads)]

    def _kv_slots(self) -> list[tuple[int, int]]:
        """(rank, local slot) of replica 0 of each original key/value head, in head order."""
        where = {}
        for rank in range(self.tp_size):
            slots = kv_replicas_for_rank(self.tp_size, rank, self.num_key_value_heads, self.kv_size_multiplier, self.kv_layout)
            where.update({head: (rank, slot) for slot, (head, replica) in enumerate(slots) if replica == 0})
        return [where[h] for h in range(self.num_key_value_heads)]

    def _original_rows(self, which: str, k: int, offset: int, local_rows: int, trailing: Shape, name: str) -> tuple[Shape, RowCopy]:
        if which == "q":  # the query heads of all ranks, concatenated, put back in head order
            total = local_rows * self.tp_size
            if total % self.num_attention_heads:
                raise Unsupported(f"{name}: {total} query rows are not whole heads")
            block = total // self.num_attention_heads
            pieces = [(k, r, offset + j * block, offset + (j + 1) * block) for r, j in self._query_slots()]
            return (total, *trailing), _rows(pieces)
        hd = self.head_dim  # key/value: replica 0 of every head
        pieces = [(k, r, offset + j * hd, offset + (j + 1) * hd) for r, j in self._kv_slots()]
        return (self.num_key_value_heads * hd, *trailing), _rows(pieces)

    def outputs(self, module: str, group: GroupShapes) -> tuple[list[Output], list[str]]:
        m, gqa = module, self.gqa_qkv_projection_name
        _check_no_lora(group, self.relevant_names(module))
        present = set(group.names)
        rows = self._local_rows()
        outputs, consumed = [], []
        for param in self._param_names:
            found: dict[str, tuple[str, int]] = {}  # projection -> (saved name, first row of its part)
            fused = f"{m}.{gqa}.{param}_qkv"
            if fused in present:
                if group.shape(fused)[0] != sum(rows.values()):
                    raise Unsupported(f"{fused}: rows disagree with the spec")
                found.update({"q": (fused, 0), "k": (fused, rows["q"]), "v": (fused, rows["q"] + rows["k"])})
                consumed.append(fused)
            for s in QKV:
                name = f"{m}.{gqa}.{param}_{s}"
                if name in present:
                    if group.shape(name)[0] != rows[s]:
                        raise Unsupported(f"{name}: rows disagree with the spec")
                    found[s] = (name, 0)
                    consumed.append(name)
            for s, (name, offset) in found.items():
                shape = group.shape(name)
                k = group.index(name)
                out_shape, provenance = self._original_rows(s, k, offset, rows[s], shape[1:], name)
                outputs.append(Output(f"{m}.{self._projection_names[s]}.{param}", out_shape, k, provenance))
        o_weight = f"{m}.{self.output_projection_name}.weight"
        if o_weight in present:  # row parallel: its columns follow the query head permutation
            shape = group.shape(o_weight)
            k = group.index(o_weight)
            if len(shape) != 2 or (shape[1] * self.tp_size) % self.num_attention_heads:
                raise Unsupported(f"{o_weight}: columns are not whole query heads")
            block = shape[1] * self.tp_size // self.num_attention_heads
            pieces = [(k, r, j * block, (j + 1) * block) for r, j in self._query_slots()]
            out_shape = (shape[0], shape[1] * self.tp_size)
            outputs.append(Output(o_weight, out_shape, k, _columns(pieces, out_shape, o_weight, shape)))
            consumed.append(o_weight)
        return outputs, consumed


# ---------------------------------------------------------------------------------------------------------------------
# FusedLinearsSpec (transformations/fused_linears.py)


@dataclass
class DeclaredFusedLinears(FusedLinearsFields, _Layout):
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
        return cls(fields["fused_linear_name"], tuple(names), fields["bias"], FUSE_AXES[fuse_axis], tuple(dims), tp)

    def outputs(self, module: str, group: GroupShapes) -> tuple[list[Output], list[str]]:
        m, fused = module, self.fused_linear_name
        _check_no_lora(group, self.relevant_names(module))
        outputs, consumed = [], []
        local = [d // self.tp_size for d in self.original_dims]
        for param in self._param_names:
            name = f"{m}.{fused}.{param}"
            if name not in group.names:
                continue
            shape, k = group.shape(name), group.index(name)
            if param == "bias" and self.fuse_axis == 1:  # row fusion: the biases are whole on every rank
                count = len(self.linear_names)
                if len(shape) != 1 or shape[0] % count:
                    raise Unsupported(f"{name}: not {count} concatenated biases")
                size = shape[0] // count
                for i, lin in enumerate(self.linear_names):
                    outputs.append(Output(f"{m}.{lin}.{param}", (size,), k, _rows([(k, 0, i * size, (i + 1) * size)])))
            else:  # each rank holds [shard_r(W_0) ; shard_r(W_1) ; ...] along the fuse axis
                dim = self.fuse_axis if param == "weight" else 0
                if len(shape) <= dim or shape[dim] != sum(local):
                    raise Unsupported(f"{name}: {shape} does not hold the fused shards along dim {dim}")
                start = 0
                for lin, size in zip(self.linear_names, local):
                    pieces = [(k, r, start, start + size) for r in range(self.tp_size)]
                    out_shape = tuple(size * self.tp_size if d == dim else n for d, n in enumerate(shape))
                    provenance = _rows(pieces) if dim == 0 else _columns(pieces, out_shape, name, shape)
                    outputs.append(Output(f"{m}.{lin}.{param}", out_shape, k, provenance))
                    start += size
            consumed.append(name)
        return outputs, consumed


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


def parameter_output(name: str, group: GroupShapes, entry: Mapping[str, Any]) -> Output:
    """Replicated: rank 0's copy. Sharded along dim d with stride s: each rank's shard cut in s chunks, chunk j of
    every rank in turn (`sharding.unshard_tensors`); rows for d = 0, columns for d = 1."""
    shape, k = group.shape(name), group.index(name)
    check_parameter_entry(name, entry, group.tp_size)
    if not entry["tensor_model_parallel"]:
        return Output(name, shape, k, _rows([(k, 0, 0, shape[0])]))
    dim, stride = entry["partition_dim"], entry["partition_stride"]
    if dim >= len(shape) or shape[dim] % stride:
        raise Unsupported(f"{name}: {shape} cannot be split along dim {dim} in {stride}")
    chunk = shape[dim] // stride
    pieces = [(k, r, j * chunk, (j + 1) * chunk) for j in range(stride) for r in range(group.tp_size)]
    out_shape = tuple(n * group.tp_size if d == dim else n for d, n in enumerate(shape))
    return Output(name, out_shape, k, _rows(pieces) if dim == 0 else _columns(pieces, out_shape, name, shape))


def group_outputs(
    module: str | None, specs: Sequence[DeclaredSpec], group: GroupShapes, parameters: Mapping[str, Mapping[str, Any]]
) -> list[Output]:
    """What `transformations.model.to_original_weights` rebuilds from one group, in its order: each spec's
    outputs, then every saved tensor no spec consumed, as a parameter."""
    outputs: list[Output] = []
    consumed: set[str] = set()
    for spec in specs:
        spec_outputs, spec_consumed = spec.outputs(module, group)  # type: ignore[arg-type]
        outputs += spec_outputs
        consumed.update(spec_consumed)
    for name in group.names:
        if name not in consumed:
            if name not in parameters:
                raise Unsupported(f"{name}: saved tensor without parameter entry")
            outputs.append(parameter_output(name, group, parameters[name]))
    if len({o.name for o in outputs}) != len(outputs):
        raise Unsupported(f"{module}: a weight is rebuilt twice")
    return outputs
