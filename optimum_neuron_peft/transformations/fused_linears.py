"""`FusedLinearsSpec`: several linears fused into one (gate_proj + up_proj -> gate_up_proj), sharded or not.

Column fusion (``fuse_axis=0``, a column-parallel fused linear): each rank holds [shard_r(W_0); shard_r(W_1); ...]
along the output dim, shards taken on each original weight separately, so unequal output dims are fine. Biases
follow the weights.

Row fusion (``fuse_axis=1``, a row-parallel fused linear over concatenated inputs): each rank holds
[shard_r(W_0) | shard_r(W_1) | ...] along the input dim. The fused linear sums the outputs, so the biases cannot
be folded into one: they are kept concatenated, full size on every rank, and split back exactly.

LoRA (names without adapter name), one adapter pair per original linear so training equals vanilla PEFT:
``<fused>.lora_A.weight_<linear>`` and ``<fused>.lora_B.weight_<linear>``; lora_B is sharded for column fusion
(dim 0), lora_A for row fusion (dim 1). optimum-neuron's shared ``<fused>.lora_A.weight`` with a fused
``<fused>.lora_B.weight`` (column fusion) is read too: its lora_A is duplicated for each linear.

That layout is written once, as a piece map (`spec_fields.FusedLinearsFields.saved_layouts`): the fused base
weights are gathered from it, ``to_original_weights`` runs its inverse (`pieces_torch`), and the consolidation
copies bytes from it (`checkpoint.declared`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import torch

from ..errors import SpecError
from .base import ModelWeightTransformationSpec, register_spec
from .peft_targets import FusedModuleSpec, FusedProjections
from .pieces_torch import gather_saved, spec_to_original
from .sharding import materialize, shard_tensor, tensor_shape
from .spec_fields import FUSE_AXES, FusedLinearsFields


@register_spec
@dataclasses.dataclass
class FusedLinearsSpec(FusedLinearsFields, FusedModuleSpec, ModelWeightTransformationSpec):
    # The fields, `_param_names` and `get_relevant_parameter_names` are `spec_fields.FusedLinearsFields`, shared with
    # the torch-free layout `checkpoint.declared.DeclaredFusedLinears`.

    def __post_init__(self):
        if self.fuse_axis not in FUSE_AXES:
            raise SpecError(f"FusedLinearsSpec({self.fused_linear_name}): fuse_axis must be 0/'column' or 1/'row', got {self.fuse_axis!r}")
        self.fuse_axis = FUSE_AXES[self.fuse_axis]
        self.linear_names = list(self.linear_names)
        self.original_dims = [int(d) for d in self.original_dims]
        if len(self.linear_names) != len(self.original_dims) or not self.linear_names:
            raise SpecError(
                f"FusedLinearsSpec({self.fused_linear_name}): expected one original dim per linear, got "
                f"linear_names={self.linear_names} and original_dims={self.original_dims}"
            )
        if self.tp_size < 1:
            raise SpecError(f"FusedLinearsSpec({self.fused_linear_name}): tp_size must be >= 1, got {self.tp_size}")
        for name, dim in zip(self.linear_names, self.original_dims):
            if dim % self.tp_size != 0:
                raise SpecError(
                    f"FusedLinearsSpec({self.fused_linear_name}): {name} has {dim} "
                    f"{'outputs' if self.fuse_axis == 0 else 'inputs'}, not divisible by tp_size={self.tp_size}"
                )

    def with_tp_size(self, tp_size: int) -> "FusedLinearsSpec":
        return dataclasses.replace(self, tp_size=tp_size)  # re-validated by __post_init__, peft_type kept

    def fused_projections(self) -> dict[str, FusedProjections]:
        names = tuple(self.linear_names)
        return {self.fused_linear_name: FusedProjections(names, names, tuple(self.original_dims), self.fuse_axis)}

    # -- layout -----------------------------------------------------------------------------------------------

    def _local_dims(self) -> list[int]:
        return [d // self.tp_size for d in self.original_dims]

    def _check_original(self, name: str, tensor: Any, index: int, param: str) -> None:
        shape = tensor_shape(tensor)
        dim = self.original_dims[index]
        if param == "weight":
            if len(shape) != 2 or shape[self.fuse_axis] != dim:
                raise SpecError(
                    f"{name}: expected a 2-D weight with {dim} {'rows' if self.fuse_axis == 0 else 'columns'}, "
                    f"found shape {tuple(shape)}"
                )
        elif self.fuse_axis == 0 and tuple(shape) != (dim,):
            raise SpecError(f"{name}: expected a bias of shape ({dim},), found {tuple(shape)}")

    def adapt_state_dict(
        self, module_fully_qualified_name: str, state_dict: Mapping[str, Any], tp_rank: int
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        self._check_tp_rank(tp_rank)
        m, fused = module_fully_qualified_name, self.fused_linear_name
        local: dict[str, torch.Tensor] = {}
        consumed: list[str] = []
        for param in self._param_names:
            names = [f"{m}.{lin}.{param}" for lin in self.linear_names]
            present = [n for n in names if n in state_dict]
            if not present:
                continue
            if len(present) != len(names):
                missing = [n for n in names if n not in state_dict]
                raise SpecError(f"{m}.{fused}.{param}: missing original tensors {missing} to build the fused {param}")
            for i, name in enumerate(names):
                self._check_original(name, state_dict[name], i, param)
            name = f"{m}.{fused}.{param}"
            if param == "bias" and self.fuse_axis == 1:
                layout = self.concatenated_layout(name, names, [tensor_shape(state_dict[n])[0] for n in names])
            else:
                layout = self.fused_layout(name, names, self.fuse_axis if param == "weight" else 0)
            local[name] = gather_saved(layout, tp_rank, state_dict)
            consumed += names
        for lin in self.linear_names:
            for lora in ("lora_A", "lora_B"):
                name = f"{m}.{lin}.{lora}.weight"
                if name not in state_dict:
                    continue
                tensor, dim = state_dict[name], self.lora_shard_dim(lora)
                if dim is not None:
                    tensor = shard_tensor(tensor, dim, self.tp_size, tp_rank, name=name)
                local[f"{m}.{fused}.{lora}.weight_{lin}"] = materialize(tensor).contiguous()
                consumed.append(name)
        return local, consumed

    # -- local -> original: the inverse of `saved_layouts` (spec_fields.FusedLinearsFields) ---------------------------

    def to_original_weights(
        self,
        module_fully_qualified_name: str,
        sharded_state_dicts: Mapping[str, Sequence[torch.Tensor]],
        parameters_metadata: Mapping[str, Mapping[str, Any]],
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        return spec_to_original(self, module_fully_qualified_name, sharded_state_dicts)
