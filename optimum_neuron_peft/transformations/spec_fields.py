"""The fields of the spec dataclasses and the parameter names they claim, in pure Python (no torch).

Each field class below is used twice: by its spec (`gqa_qkv.GQAQKVColumnParallelLinearSpec`,
`fused_linears.FusedLinearsSpec`, which import torch) and by its torch-free layout (`checkpoint.declared`, used by
the consolidation engine that never imports torch). Declaring the fields and the names once keeps the two from
drifting apart.

The field classes are plain (not frozen) dataclasses: the specs normalize their fields in ``__post_init__``, and a
frozen dataclass may not inherit a non-frozen one, so the declared layouts are not frozen either. A subclass that
declares no fields of its own keeps the order of the fields here, after those of its other dataclass bases (the
specs' keyword-only ``peft_type``).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

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


@dataclasses.dataclass
class FusedLinearsFields(_LinearParams):
    fused_linear_name: str
    linear_names: Sequence[str]  # a list in the spec, a tuple in the declared layout
    bias: bool
    fuse_axis: int
    original_dims: Sequence[int]  # as linear_names
    tp_size: int

    def get_relevant_parameter_names(self, module_fully_qualified_name: str) -> set[str]:
        m, fused = module_fully_qualified_name, self.fused_linear_name
        names = {f"{m}.{fused}.{p}" for p in self._param_names}
        names |= {f"{m}.{lin}.{p}" for lin in self.linear_names for p in self._param_names}
        for lora in ("lora_A", "lora_B"):
            names.add(f"{m}.{fused}.{lora}.weight")
            names |= {f"{m}.{fused}.{lora}.weight_{lin}" for lin in self.linear_names}
            names |= {f"{m}.{lin}.{lora}.weight" for lin in self.linear_names}
        return names
