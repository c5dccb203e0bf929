"""Each spec's fields, the parameter names it claims and its layout (`saved_layouts`), in pure Python (no torch).

This is the one place a spec's layout is written. ``saved_layouts(module, shapes)`` says, for each saved tensor
of the module, which blocks of which original tensors each tp rank holds (`pieces.SavedLayout`: base weights and
LoRA weights, optimum-neuron's shared lora_A included); every direction runs from it: the specs'
``to_original_weights`` (`pieces_torch`), the consolidation byte copies (`checkpoint.declared`) and the test
oracle. Each field class is used by its spec (`gqa_qkv.GQAQKVColumnParallelLinearSpec`,
`fused_linears.FusedLinearsSpec`, which import torch) and by the torch-free consolidation (`checkpoint.declared`).

The field classes are plain (not frozen) dataclasses: the specs normalize their fields in ``__post_init__``, and a
frozen dataclass may not inherit a non-frozen one, so the declared layouts are not frozen either. A subclass that
declares no fields of its own keeps the order of the fields here, after those of its other dataclass bases (the
specs' keyword-only ``peft_type``).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from ..errors import SpecError
from .gqa_layout import KV_LAYOUTS, gqa_shape_problem, kv_head_indices_for_rank, query_head_indices_for_rank
from .parallel_plan import COLUMN, LORA_PARTITION_DIM, ROW
from .pieces import Block, SavedLayout, Shape, merge_blocks, rank_shapes, replicated, sharded

Shapes = Mapping[str, Sequence[Shape]]  # saved name -> its shape on each rank

QKV = ("q", "k", "v")
FUSE_AXES = {"column": 0, "row": 1, 0: 0, 1: 1}  # the values `FusedLinearsSpec.fuse_axis` accepts -> the axis


class _LinearParams:
    bias: bool  # a field of each subclass

    @property
    def _param_names(self) -> list[str]:
        """The base parameters of each linear: its weight, and its bias when the linears have one."""
        return ["weight", "bias"] if self.bias else ["weight"]


@dataclasses.dataclass
class GQAQKVFields(_LinearParams):
    gqa_qkv_projection_name: str
    query_projection_name: str
    key_projection_name: str
    value_projection_name: str
    output_projection_name: str
    num_attention_heads: int
    num_key_value_heads: int
    kv_size_multiplier: int
    q_output_size_per_partition: int
    kv_output_size_per_partition: int
    fuse_qkv: bool
    bias: bool
    tp_size: int
    kv_layout: str = "tiled"

    @property
    def head_dim(self) -> int:
        return self.q_output_size_per_partition * self.tp_size // self.num_attention_heads

    @property
    def _projection_names(self) -> dict[str, str]:
        return {"q": self.query_projection_name, "k": self.key_projection_name, "v": self.value_projection_name}

    def fused_names(self) -> dict[str, tuple[str, ...]]:
        """{fused module: its original projections, in order}: the torch-free part of the specs' `fused_projections`
        (consolidation restores adapter targets from it)."""
        return {self.gqa_qkv_projection_name: tuple(self._projection_names.values())}

    def _local_rows(self) -> dict[str, int]:
        kv = self.kv_output_size_per_partition
        return {"q": self.q_output_size_per_partition, "k": kv, "v": kv}

    def get_relevant_parameter_names(self, module_fully_qualified_name: str) -> set[str]:
        m, gqa = module_fully_qualified_name, self.gqa_qkv_projection_name
        originals = [*self._projection_names.values(), self.output_projection_name]
        names = {f"{m}.{proj}.{p}" for proj in originals for p in self._param_names}
        suffixes = ["qkv"] if self.fuse_qkv else list(QKV)
        names |= {f"{m}.{gqa}.{p}_{s}" for p in self._param_names for s in suffixes}
        for lora in ("lora_A", "lora_B"):
            names |= {f"{m}.{proj}.{lora}.weight" for proj in originals}
            names |= {f"{m}.{gqa}.{lora}.weight", f"{m}.{gqa}.{lora}.weight_qkv"}
            names |= {f"{m}.{gqa}.{lora}.weight_{s}" for s in QKV}
        return names

    def field_problem(self) -> str | None:
        """Why these fields describe no valid layout, or None (the spec's ``__post_init__`` says it in detail)."""
        problem = gqa_shape_problem(self.tp_size, self.num_attention_heads, self.num_key_value_heads, self.kv_size_multiplier)
        if problem is not None:
            return problem
        if self.kv_layout not in KV_LAYOUTS:
            return f"kv_layout must be one of {KV_LAYOUTS}, got {self.kv_layout!r}"
        expected_kv = self.num_key_value_heads * self.kv_size_multiplier * self.head_dim // self.tp_size
        if (self.q_output_size_per_partition * self.tp_size) % self.num_attention_heads or self.kv_output_size_per_partition != expected_kv:
            return "partition sizes disagree with the head counts"
        return None

    # -- layout ---------------------------------------------------------------------------------------------------

    def rank_rows(self, which: str, tp_rank: int, head_size: int | None = None) -> list[tuple[int, int]]:
        """The ``[start, stop)`` ranges, in local order, of the original q (``which="q"``) or k/v rows that
        ``tp_rank`` holds, for heads of ``head_size`` rows (head_dim by default; o_proj columns use it too).
        The head placement is `gqa_layout`'s."""
        args = (self.tp_size, tp_rank)
        if which == "q":
            heads = query_head_indices_for_rank(
                *args, self.num_attention_heads, self.num_key_value_heads, self.kv_size_multiplier, self.kv_layout
            )
        else:
            heads = kv_head_indices_for_rank(*args, self.num_key_value_heads, self.kv_size_multiplier, self.kv_layout)
        size = self.head_dim if head_size is None else head_size
        return merge_blocks([(h * size, (h + 1) * size) for h in heads])

    def _check_saved_rows(self, name: str, ranks: Sequence[Shape], rows: int) -> None:
        for rank, shape in enumerate(ranks):
            if not shape or shape[0] != rows:
                raise SpecError(f"{name}: rank {rank} holds shape {tuple(shape)}, expected {rows} rows")

    def qkv_layout(self, name: str, originals: Mapping[str, str]) -> SavedLayout:
        """``name`` holding, on each rank, its rows of each original in ``originals`` ({"q"|"k"|"v": original
        name}), concatenated in that order: [q; k; v] when fused."""
        ranks = tuple(
            tuple(Block(original, a, b) for s, original in originals.items() for a, b in self.rank_rows(s, r))
            for r in range(self.tp_size)
        )
        return SavedLayout(name, 0, ranks)

    def _qkv_layouts(self, shapes: Shapes, prefix: str, fused_names: Sequence[str], originals: Mapping[str, str]) -> list[SavedLayout]:
        """The q/k/v rows saved as ``<prefix>_{q,k,v}`` or as one of ``fused_names`` ([q; k; v] on each rank)."""
        rows, tp = self._local_rows(), self.tp_size
        layouts = []
        for fused in fused_names:
            if fused in shapes:
                self._check_saved_rows(fused, rank_shapes(shapes, fused, tp), sum(rows.values()))
                layouts.append(self.qkv_layout(fused, originals))
                break
        for s in QKV:
            name = f"{prefix}_{s}"
            if name in shapes:
                self._check_saved_rows(name, rank_shapes(shapes, name, tp), rows[s])
                layouts.append(self.qkv_layout(name, {s: originals[s]}))
        return layouts

    def _output_layout(self, shapes: Shapes, name: str) -> SavedLayout:
        """o_proj weight / lora_A (row parallel): columns of the rank's query heads, in their local order."""
        shape = rank_shapes(shapes, name, self.tp_size)[0]
        if len(shape) != 2 or (shape[1] * self.tp_size) % self.num_attention_heads:
            raise SpecError(f"{name}: shape {tuple(shape)} does not hold whole query heads in its columns")
        block = shape[1] * self.tp_size // self.num_attention_heads
        ranks = tuple(
            tuple(Block(name, a, b) for a, b in self.rank_rows("q", r, block)) for r in range(self.tp_size)
        )
        return SavedLayout(name, 1, ranks)

    def saved_layouts(self, module_fully_qualified_name: str, shapes: Shapes) -> list[SavedLayout]:
        """The layout of each saved tensor of this module present in ``shapes``, in the order the originals are
        rebuilt. Per rank: q rows in `gqa_layout`'s query head order, k/v rows the rank's replicated key/value
        heads, [q; k; v] when fused; o_proj columns in query head order; LoRA A full on every rank (one per
        projection, or optimum-neuron's shared one read as each projection's), LoRA B laid out like the base rows."""
        m, gqa, proj, tp = module_fully_qualified_name, self.gqa_qkv_projection_name, self._projection_names, self.tp_size
        layouts: list[SavedLayout] = []
        for param in self._param_names:
            originals = {s: f"{m}.{proj[s]}.{param}" for s in QKV}
            layouts += self._qkv_layouts(shapes, f"{m}.{gqa}.{param}", [f"{m}.{gqa}.{param}_qkv"], originals)
        o_weight = f"{m}.{self.output_projection_name}.weight"
        if o_weight in shapes:
            layouts.append(self._output_layout(shapes, o_weight))
        lora_b = {s: f"{m}.{proj[s]}.lora_B.weight" for s in QKV}
        fused_b = [f"{m}.{gqa}.lora_B.weight_qkv", f"{m}.{gqa}.lora_B.weight"]
        layouts += self._qkv_layouts(shapes, f"{m}.{gqa}.lora_B.weight", fused_b, lora_b)
        lora_a = {s: f"{m}.{proj[s]}.lora_A.weight" for s in QKV}
        for s in QKV:
            name = f"{m}.{gqa}.lora_A.weight_{s}"
            if name in shapes:
                layouts.append(replicated(name, lora_a[s], rank_shapes(shapes, name, tp)[0][0], tp))
        shared = f"{m}.{gqa}.lora_A.weight"
        if shared in shapes:
            size = rank_shapes(shapes, shared, tp)[0][0]
            layouts += [replicated(shared, lora_a[s], size, tp) for s in QKV]
        o_lora_a = f"{m}.{self.output_projection_name}.lora_A.weight"
        if o_lora_a in shapes:
            layouts.append(self._output_layout(shapes, o_lora_a))
        return layouts


@dataclasses.dataclass
class FusedLinearsFields(_LinearParams):
    fused_linear_name: str
    linear_names: Sequence[str]  # a list in the spec, a tuple in the declared layout
    bias: bool
    fuse_axis: int
    original_dims: Sequence[int]  # as linear_names
    tp_size: int

    def fused_names(self) -> dict[str, tuple[str, ...]]:
        """{fused module: its original linears, in order} (as `GQAQKVFields.fused_names`)."""
        return {self.fused_linear_name: tuple(self.linear_names)}

    def get_relevant_parameter_names(self, module_fully_qualified_name: str) -> set[str]:
        m, fused = module_fully_qualified_name, self.fused_linear_name
        names = {f"{m}.{fused}.{p}" for p in self._param_names}
        names |= {f"{m}.{lin}.{p}" for lin in self.linear_names for p in self._param_names}
        for lora in ("lora_A", "lora_B"):
            names.add(f"{m}.{fused}.{lora}.weight")
            names |= {f"{m}.{fused}.{lora}.weight_{lin}" for lin in self.linear_names}
            names |= {f"{m}.{lin}.{lora}.weight" for lin in self.linear_names}
        return names

    def field_problem(self) -> str | None:
        """Why these fields describe no valid layout, or None (the spec's ``__post_init__`` says it in detail)."""
        if not self.linear_names or len(self.linear_names) != len(self.original_dims) or self.tp_size < 1:
            return f"linear_names {self.linear_names!r} / original_dims {self.original_dims!r} / tp_size {self.tp_size}"
        if self.fuse_axis not in (0, 1) or any(d % self.tp_size for d in self.original_dims):
            return f"original_dims {self.original_dims!r} over tp_size={self.tp_size} along fuse_axis {self.fuse_axis!r}"
        return None

    # -- layout ---------------------------------------------------------------------------------------------------

    def fused_layout(self, name: str, originals: Sequence[str], dim: int) -> SavedLayout:
        """``name`` holding, on each rank, [shard_r(W_0), shard_r(W_1), ...] of ``originals`` along ``dim``."""
        local = [d // self.tp_size for d in self.original_dims]
        blocks = [
            tuple(Block(o, r * n, (r + 1) * n) for o, n in zip(originals, local)) for r in range(self.tp_size)
        ]
        return SavedLayout(name, dim, tuple(blocks))

    def _fused_layout(self, name: str, ranks: Sequence[Shape], originals: Sequence[str], dim: int) -> SavedLayout:
        """`fused_layout`, its saved shapes checked."""
        local = sum(d // self.tp_size for d in self.original_dims)
        for rank, shape in enumerate(ranks):
            if len(shape) <= dim or shape[dim] != local:
                raise SpecError(
                    f"{name}: rank {rank} holds shape {tuple(shape)}, expected {local} entries along "
                    f"dim {dim} (original dims {list(self.original_dims)} / tp_size {self.tp_size})"
                )
        return self.fused_layout(name, originals, dim)

    def concatenated_layout(self, name: str, originals: Sequence[str], sizes: Sequence[int]) -> SavedLayout:
        """``name`` holding the whole ``originals`` (of ``sizes`` rows) concatenated, on every rank (the biases of
        a row-fused linear: it sums the outputs, so they cannot be folded into one)."""
        return SavedLayout(name, 0, (tuple(Block(o, 0, n) for o, n in zip(originals, sizes)),) * self.tp_size)

    def lora_layout(self, name: str, original: str, lora: str, size: int) -> SavedLayout:
        """One linear's ``lora`` ("lora_A" / "lora_B") weight saved as ``name``: sharded like the base weight
        (lora_B of a column-fused linear along dim 0, lora_A of a row-fused one along dim 1; ``size``: the full
        size along that dim), else whole on every rank (``size`` rows)."""
        dim = self.lora_shard_dim(lora)
        if dim is not None:
            return sharded(name, original, size, self.tp_size, dim)
        return replicated(name, original, size, self.tp_size)

    def lora_shard_dim(self, lora: str) -> int | None:
        """The dim along which each linear's ``lora`` ("lora_A" / "lora_B") weight is sharded like the base weight,
        or None when it is whole on every rank: the plan's one LoRA rule (`parallel_plan.LORA_PARTITION_DIM`)."""
        sharded_lora, dim = LORA_PARTITION_DIM[COLUMN if self.fuse_axis == 0 else ROW]
        return dim if lora == sharded_lora else None

    def saved_layouts(self, module_fully_qualified_name: str, shapes: Shapes) -> list[SavedLayout]:
        """The layout of each saved tensor of this module present in ``shapes``, in the order the originals are
        rebuilt: the fused weight (and bias) holds each linear's shard along the fuse axis, except a row-fused
        bias (the concatenated biases, whole on every rank); LoRA: one pair per linear, lora_B sharded for column
        fusion, lora_A for row fusion, the other whole; optimum-neuron's shared lora_A (each linear's) and fused
        lora_B (column fusion only)."""
        m, fused, tp = module_fully_qualified_name, self.fused_linear_name, self.tp_size
        layouts: list[SavedLayout] = []
        for param in self._param_names:
            name = f"{m}.{fused}.{param}"
            if name not in shapes:
                continue
            ranks = rank_shapes(shapes, name, tp)
            originals = [f"{m}.{lin}.{param}" for lin in self.linear_names]
            if param == "bias" and self.fuse_axis == 1:
                whole, count = ranks[0], len(originals)
                if len(whole) != 1 or whole[0] % count:
                    raise SpecError(f"{name}: expected concatenated biases of equal size, found shape {tuple(whole)}")
                layouts.append(self.concatenated_layout(name, originals, [whole[0] // count] * count))
            else:
                layouts.append(self._fused_layout(name, ranks, originals, self.fuse_axis if param == "weight" else 0))
        for lin in self.linear_names:
            for lora in ("lora_A", "lora_B"):
                name = f"{m}.{fused}.{lora}.weight_{lin}"
                if name not in shapes:
                    continue
                shape, dim = rank_shapes(shapes, name, tp)[0], self.lora_shard_dim(lora)
                if dim is not None and len(shape) <= dim:
                    raise SpecError(f"{name}: a {len(shape)}-D LoRA weight sharded along dim {dim}")
                full = shape[dim] * tp if dim is not None else shape[0]
                layouts.append(self.lora_layout(name, f"{m}.{lin}.{lora}.weight", lora, full))
        shared_a, fused_b = f"{m}.{fused}.lora_A.weight", f"{m}.{fused}.lora_B.weight"
        if shared_a in shapes or fused_b in shapes:
            if self.fuse_axis != 0:
                raise SpecError(f"{shared_a}: a shared LoRA on a row-fused linear cannot be split into its linears")
            if shared_a in shapes:
                size = rank_shapes(shapes, shared_a, tp)[0][0]
                layouts += [replicated(shared_a, f"{m}.{lin}.lora_A.weight", size, tp) for lin in self.linear_names]
            if fused_b in shapes:
                originals = [f"{m}.{lin}.lora_B.weight" for lin in self.linear_names]
                layouts.append(self._fused_layout(fused_b, rank_shapes(shapes, fused_b, tp), originals, 0))
        return layouts
