"""`GQAQKVColumnParallelLinearSpec`: q/k/v projections -> the GQA QKV column-parallel layer, and o_proj permuted.

Per rank (docs/checkpoint_formats.md section 2): q rows = H*hd/tp, in the query-head order of `gqa_layout`; k and v rows =
K*m*hd/tp, the rank's chunk of the m-times replicated key/value heads; with ``fuse_qkv`` one ``weight_qkv`` =
[q; k; v]. ``o_proj`` (row parallel) holds the columns of the same query heads, in the same order; its bias is
neither sharded nor permuted and is left to the generic path.

LoRA (names without adapter name): ours keeps one pair per projection, ``qkv_proj.lora_A.weight_{q,k,v}`` and
``qkv_proj.lora_B.weight_{q,k,v}``, split by the column-parallel rule of `parallel_plan.LORA_PARTITION_DIM` (lora_B
rows laid out like the base weights, lora_A whole on every rank). optimum-neuron's shared ``qkv_proj.lora_A.weight`` is duplicated for q, k and v, and its fused lora_B
(``lora_B.weight_qkv`` or ``lora_B.weight``) is split. ``o_proj.lora_A.weight`` (sharded along its columns) follows
the output permutation; ``o_proj.lora_B.weight`` is replicated and left to the generic path.

That layout is written once, as a piece map (`spec_fields.GQAQKVFields.saved_layouts`, head placement from
`gqa_layout`): ``adapt_state_dict`` gathers each rank's tensors from it, ``to_original_weights`` runs its inverse
(`pieces_torch`), and the consolidation copies bytes from it (`checkpoint.declared`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal, Mapping, Sequence

import torch

from ..errors import SpecError
from .base import ModelWeightTransformationSpec, register_spec
from .parallel_plan import COLUMN, LORA_PARTITION_DIM
from .peft_targets import FusedModuleSpec, FusedProjections
from .gqa_layout import (
    KVLayout,
    check_gqa_shape,
    default_kv_size_multiplier,
    kv_head_indices_for_rank,
    query_head_indices_for_rank,
)
from .pieces import merge_blocks
from .pieces_torch import gather_saved, spec_to_original
from .sharding import take_blocks, tensor_shape
from .spec_fields import QKV, GQAQKVFields


def _head_blocks(heads: Sequence[int], head_dim: int) -> list[tuple[int, int]]:
    return [(h * head_dim, (h + 1) * head_dim) for h in heads]


def query_or_output_blocks(
    size: int, num_attention_heads: int, num_key_value_heads: int, kv_size_multiplier: int,
    query_or_output_proj: Literal["query", "output"], tp_size: int, tp_rank: int, kv_layout: KVLayout = "tiled",
) -> list[tuple[int, int]]:  # fmt: skip
    """The ``[start, stop)`` ranges, in local order, of this rank's query heads along a dim of ``size`` (q_proj
    rows or o_proj columns)."""
    if query_or_output_proj not in ("query", "output"):
        raise SpecError(f"query_or_output_proj must be 'query' or 'output', got {query_or_output_proj!r}")
    if size % num_attention_heads != 0:
        raise SpecError(
            f"{query_or_output_proj} projection: dim {0 if query_or_output_proj == 'query' else 1} has size {size}, "
            f"not a multiple of num_attention_heads={num_attention_heads}"
        )
    heads = query_head_indices_for_rank(
        tp_size, tp_rank, num_attention_heads, num_key_value_heads, kv_size_multiplier, kv_layout
    )
    return _head_blocks(heads, size // num_attention_heads)


def create_query_or_output_projection_local_weight_from_regular_weight(
    weight_data: Any,
    num_attention_heads: int,
    num_key_value_heads: int,
    kv_size_multiplier: int,
    query_or_output_proj: Literal["query", "output"],
    tp_size: int,
    tp_rank: int,
    kv_layout: KVLayout = "tiled",
) -> torch.Tensor:
    """This rank's rows of a q_proj weight/bias (``"query"``) or columns of an o_proj weight (``"output"``)."""
    dim = 0 if query_or_output_proj == "query" else 1
    blocks = query_or_output_blocks(
        tensor_shape(weight_data)[dim], num_attention_heads, num_key_value_heads, kv_size_multiplier,
        query_or_output_proj, tp_size, tp_rank, kv_layout,
    )  # fmt: skip
    return take_blocks(weight_data, dim, blocks)


def kv_blocks(
    rows: int, kv_size_multiplier: int, output_size_per_partition: int, tp_size: int, tp_rank: int,
    num_key_value_heads: int | None = None, kv_layout: KVLayout = "tiled",
) -> list[tuple[int, int]]:  # fmt: skip
    """The ``[start, stop)`` row ranges of a k_proj / v_proj tensor of ``rows`` rows that make up this rank's rows
    after replicating its heads ``kv_size_multiplier`` times.

    ``num_key_value_heads`` is needed only for the interleaved layout (tiled replication does not depend on it).
    """
    if rows * kv_size_multiplier != output_size_per_partition * tp_size:
        raise SpecError(
            f"key/value projection: {rows} rows replicated {kv_size_multiplier} times must fill tp_size={tp_size} "
            f"partitions of {output_size_per_partition} rows, but {rows}*{kv_size_multiplier} != "
            f"{output_size_per_partition}*{tp_size}"
        )
    if kv_layout == "tiled":  # tiled replication does not depend on the head size: place single rows
        heads, head_dim = rows, 1
    elif num_key_value_heads is None or rows % num_key_value_heads:
        raise SpecError(
            f"key/value projection: the interleaved layout needs num_key_value_heads dividing {rows} rows, "
            f"got {num_key_value_heads}"
        )
    else:
        heads, head_dim = num_key_value_heads, rows // num_key_value_heads
    placed = kv_head_indices_for_rank(tp_size, tp_rank, heads, kv_size_multiplier, kv_layout)
    return merge_blocks([(h * head_dim, (h + 1) * head_dim) for h in placed])


def create_kv_proj_local_weight_from_regular_weight(
    weight_data: Any,
    kv_size_multiplier: int,
    output_size_per_partition: int,
    tp_size: int,
    tp_rank: int,
    num_key_value_heads: int | None = None,
    kv_layout: KVLayout = "tiled",
) -> torch.Tensor:
    """This rank's rows of a k_proj / v_proj weight or bias after replicating its heads ``kv_size_multiplier`` times
    (see `kv_blocks`)."""
    blocks = kv_blocks(
        tensor_shape(weight_data)[0], kv_size_multiplier, output_size_per_partition, tp_size, tp_rank,
        num_key_value_heads, kv_layout,
    )  # fmt: skip
    return take_blocks(weight_data, 0, blocks)


def compute_query_indices_for_rank(
    tp_size: int,
    tp_rank: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    kv_size_multiplier: int,
    kv_layout: KVLayout = "tiled",
) -> torch.Tensor:
    """Original query head indices held by ``tp_rank``, in local order (see `gqa_layout`)."""
    heads = query_head_indices_for_rank(
        tp_size, tp_rank, num_attention_heads, num_key_value_heads, kv_size_multiplier, kv_layout
    )
    return torch.tensor(heads, dtype=torch.long)


@register_spec
@dataclasses.dataclass
class GQAQKVColumnParallelLinearSpec(GQAQKVFields, FusedModuleSpec, ModelWeightTransformationSpec):
    # The fields, `head_dim`, the name helpers and `get_relevant_parameter_names` are `spec_fields.GQAQKVFields`,
    # shared with the torch-free layout `checkpoint.declared.DeclaredGQAQKV`.

    serialized_defaults: ClassVar[dict[str, Any]] = {"kv_layout": "tiled"}  # optimum-neuron has no such field

    compute_query_indices_for_rank = staticmethod(compute_query_indices_for_rank)
    create_kv_proj_local_weight_from_regular_weight = staticmethod(create_kv_proj_local_weight_from_regular_weight)
    create_query_or_output_projection_local_weight_from_regular_weight = staticmethod(
        create_query_or_output_projection_local_weight_from_regular_weight
    )

    def __post_init__(self):
        where = f"GQAQKVColumnParallelLinearSpec({self.gqa_qkv_projection_name})"
        check_gqa_shape(self.tp_size, self.num_attention_heads, self.num_key_value_heads, self.kv_size_multiplier, where=where)
        if self.kv_layout not in ("tiled", "interleaved"):
            raise SpecError(f"{where}: kv_layout must be 'tiled' or 'interleaved', got {self.kv_layout!r}")
        q_total = self.q_output_size_per_partition * self.tp_size
        if q_total % self.num_attention_heads:
            raise SpecError(
                f"{where}: q_output_size_per_partition={self.q_output_size_per_partition} * tp_size={self.tp_size} "
                f"is not a multiple of num_attention_heads={self.num_attention_heads}"
            )
        expected_kv = self.num_key_value_heads * self.kv_size_multiplier * self.head_dim // self.tp_size
        if self.kv_output_size_per_partition != expected_kv:
            raise SpecError(
                f"{where}: kv_output_size_per_partition must be K*m*head_dim/tp = {expected_kv}, "
                f"got {self.kv_output_size_per_partition}"
            )

    @classmethod
    def create(
        cls,
        *,
        num_attention_heads: int,
        num_key_value_heads: int,
        head_dim: int,
        tp_size: int,
        kv_size_multiplier: int | None = None,
        fuse_qkv: bool = False,
        bias: bool = False,
        kv_layout: str = "tiled",
        gqa_qkv_projection_name: str = "qkv_proj",
        query_projection_name: str = "q_proj",
        key_projection_name: str = "k_proj",
        value_projection_name: str = "v_proj",
        output_projection_name: str = "o_proj",
    ) -> "GQAQKVColumnParallelLinearSpec":
        """Build a spec from head counts, choosing the smallest valid ``kv_size_multiplier`` when None."""
        if kv_size_multiplier is None:
            kv_size_multiplier = default_kv_size_multiplier(tp_size, num_attention_heads, num_key_value_heads)
        check_gqa_shape(tp_size, num_attention_heads, num_key_value_heads, kv_size_multiplier)
        return cls(
            gqa_qkv_projection_name=gqa_qkv_projection_name,
            query_projection_name=query_projection_name,
            key_projection_name=key_projection_name,
            value_projection_name=value_projection_name,
            output_projection_name=output_projection_name,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            kv_size_multiplier=kv_size_multiplier,
            q_output_size_per_partition=num_attention_heads * head_dim // tp_size,
            kv_output_size_per_partition=num_key_value_heads * kv_size_multiplier * head_dim // tp_size,
            fuse_qkv=fuse_qkv,
            bias=bias,
            tp_size=tp_size,
            kv_layout=kv_layout,
        )

    def with_tp_size(self, tp_size: int) -> "GQAQKVColumnParallelLinearSpec":
        """The kv_size_multiplier becomes the smallest valid one for ``tp_size``."""
        new = type(self).create(
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, tp_size=tp_size, fuse_qkv=self.fuse_qkv, bias=self.bias, kv_layout=self.kv_layout,
            gqa_qkv_projection_name=self.gqa_qkv_projection_name, query_projection_name=self.query_projection_name,
            key_projection_name=self.key_projection_name, value_projection_name=self.value_projection_name,
            output_projection_name=self.output_projection_name,
        )  # fmt: skip
        new.peft_type = self.peft_type
        return new

    def fused_projections(self) -> dict[str, FusedProjections]:
        hd, kv = self.head_dim, self.num_key_value_heads
        projections = FusedProjections(
            keys=QKV, original_names=tuple(self._projection_names.values()),
            out_features=(self.num_attention_heads * hd, kv * hd, kv * hd),
        )  # fmt: skip
        return {self.gqa_qkv_projection_name: projections}

    def permuted_input_modules(self) -> dict[str, str]:
        return {self.output_projection_name: self.gqa_qkv_projection_name}

    # -- original -> local --------------------------------------------------------------------------------------

    def _check_rows(self, name: str, tensor: Any, which: str) -> None:
        heads = self.num_attention_heads if which == "q" else self.num_key_value_heads
        rows = tensor_shape(tensor)[0]
        if rows != heads * self.head_dim:
            raise SpecError(
                f"{name}: expected {heads} heads x head_dim {self.head_dim} = {heads * self.head_dim} rows, found "
                f"shape {tuple(tensor_shape(tensor))}"
            )

    def adapt_state_dict(
        self, module_fully_qualified_name: str, state_dict: Mapping[str, Any], tp_rank: int
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        self._check_tp_rank(tp_rank)
        m, gqa, proj = module_fully_qualified_name, self.gqa_qkv_projection_name, self._projection_names
        local: dict[str, torch.Tensor] = {}
        consumed: list[str] = []
        for param in self._param_names:
            names = {s: f"{m}.{proj[s]}.{param}" for s in QKV}
            present = [n for n in names.values() if n in state_dict]
            if present and len(present) != 3:
                missing = [n for n in names.values() if n not in state_dict]
                raise SpecError(f"{m}.{gqa}: missing original tensors {missing} to build the GQA QKV {param}")
            if present:
                for s in QKV:
                    self._check_rows(names[s], state_dict[names[s]], s)
                if self.fuse_qkv:
                    saved = {f"{m}.{gqa}.{param}_qkv": names}
                else:
                    saved = {f"{m}.{gqa}.{param}_{s}": {s: names[s]} for s in QKV}
                for name, originals in saved.items():
                    local[name] = gather_saved(self.qkv_layout(name, originals), tp_rank, state_dict)
                consumed += list(names.values())
        o_weight = f"{m}.{self.output_projection_name}.weight"
        if o_weight in state_dict:
            local[o_weight] = self._local_output(o_weight, state_dict[o_weight], tp_rank)
            consumed.append(o_weight)
        # LoRA: one pair per projection, by the plan's column-parallel rule: the sharded one (lora_B, dim 0) laid out
        # like the base rows, the other (lora_A) whole on every rank.
        sharded_lora, _ = LORA_PARTITION_DIM[COLUMN]
        for s in QKV:
            for lora in ("lora_A", "lora_B"):
                original = f"{m}.{proj[s]}.{lora}.weight"
                if original not in state_dict:
                    continue
                name = f"{m}.{gqa}.{lora}.weight_{s}"
                if lora == sharded_lora:
                    self._check_rows(original, state_dict[original], s)
                    local[name] = gather_saved(self.qkv_layout(name, {s: original}), tp_rank, state_dict)
                else:
                    local[name] = take_blocks(state_dict[original], 0, [(0, tensor_shape(state_dict[original])[0])])
                consumed.append(original)
        o_lora_a = f"{m}.{self.output_projection_name}.lora_A.weight"
        if o_lora_a in state_dict:
            local[o_lora_a] = self._local_output(o_lora_a, state_dict[o_lora_a], tp_rank)
            consumed.append(o_lora_a)
        return local, consumed

    def _local_output(self, name: str, tensor: Any, tp_rank: int) -> torch.Tensor:
        cols = tensor_shape(tensor)[1]
        if cols != self.num_attention_heads * self.head_dim:
            raise SpecError(
                f"{name}: expected {self.num_attention_heads * self.head_dim} columns (query heads x head_dim), "
                f"found shape {tuple(tensor_shape(tensor))}"
            )
        return create_query_or_output_projection_local_weight_from_regular_weight(
            tensor, self.num_attention_heads, self.num_key_value_heads, self.kv_size_multiplier, "output",
            self.tp_size, tp_rank, self.kv_layout,
        )

    # -- local -> original: the inverse of `saved_layouts` (spec_fields.GQAQKVFields) ------------------------------

    def to_original_weights(
        self,
        module_fully_qualified_name: str,
        sharded_state_dicts: Mapping[str, Sequence[torch.Tensor]],
        parameters_metadata: Mapping[str, Mapping[str, Any]],
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        return spec_to_original(self, module_fully_qualified_name, sharded_state_dicts)
