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
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import torch

from ..errors import SpecError
from .base import ModelWeightTransformationSpec, register_spec
from .parallel_plan import COLUMN, LORA_PARTITION_DIM, ROW
from .peft_targets import FusedModuleSpec
from .sharding import gather_blocks, materialize, shard_ranges, shard_tensor, tensor_shape, unshard_tensors
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

    # -- names ------------------------------------------------------------------------------------------------

    @property
    def fused_module_name(self) -> str:
        return self.fused_linear_name

    @property
    def fused_projection_names(self) -> list[str]:
        return list(self.linear_names)

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
            if param == "bias" and self.fuse_axis == 1:
                pieces = [materialize(state_dict[n]) for n in names]  # row fusion: biases stay whole
                local[f"{m}.{fused}.{param}"] = torch.cat(pieces, dim=0)
            else:
                dim = self.fuse_axis if param == "weight" else 0
                pieces = [(state_dict[n], shard_ranges(state_dict[n], dim, self.tp_size, tp_rank, name=n)) for n in names]
                local[f"{m}.{fused}.{param}"] = gather_blocks(pieces, dim)
            consumed += names
        # LoRA: lora_B of a column-fused linear and lora_A of a row-fused one are sharded like the base weight.
        sharded, sharded_dim = LORA_PARTITION_DIM[COLUMN if self.fuse_axis == 0 else ROW]
        for lin in self.linear_names:
            for lora in ("lora_A", "lora_B"):
                name = f"{m}.{lin}.{lora}.weight"
                if name not in state_dict:
                    continue
                tensor = state_dict[name]
                if lora == sharded:
                    tensor = shard_tensor(tensor, sharded_dim, self.tp_size, tp_rank, name=name)
                local[f"{m}.{fused}.{lora}.weight_{lin}"] = materialize(tensor).contiguous()
                consumed.append(name)
        return local, consumed

    def _unfuse(self, name: str, shards: Sequence[torch.Tensor], dim: int) -> list[torch.Tensor]:
        """Split each rank's fused tensor per linear along ``dim`` and rebuild each linear's full tensor."""
        local_dims = self._local_dims()
        per_rank = []
        for rank, shard in enumerate(shards):
            if shard.dim() <= dim or shard.shape[dim] != sum(local_dims):
                raise SpecError(
                    f"{name}: rank {rank} holds shape {tuple(shard.shape)}, expected {sum(local_dims)} entries along "
                    f"dim {dim} (original dims {self.original_dims} / tp_size {self.tp_size})"
                )
            per_rank.append(shard.split(local_dims, dim=dim))
        return [unshard_tensors([pieces[i] for pieces in per_rank], dim, name=name) for i in range(len(local_dims))]

    def to_original_weights(
        self,
        module_fully_qualified_name: str,
        sharded_state_dicts: Mapping[str, Sequence[torch.Tensor]],
        parameters_metadata: Mapping[str, Mapping[str, Any]],
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        m, fused = module_fully_qualified_name, self.fused_linear_name
        original: dict[str, torch.Tensor] = {}
        consumed: list[str] = []
        for param in self._param_names:
            name = f"{m}.{fused}.{param}"
            if name not in sharded_state_dicts:
                continue
            shards = self._ranks(name, sharded_state_dicts)
            if param == "bias" and self.fuse_axis == 1:
                whole = shards[0]
                if whole.shape != (len(self.linear_names) * (whole.shape[0] // len(self.linear_names)),):
                    raise SpecError(f"{name}: expected concatenated biases of equal size, found shape {tuple(whole.shape)}")
                pieces = whole.chunk(len(self.linear_names))
            else:
                pieces = self._unfuse(name, shards, self.fuse_axis if param == "weight" else 0)
            for lin, piece in zip(self.linear_names, pieces):
                original[f"{m}.{lin}.{param}"] = piece.contiguous()
            consumed.append(name)
        sharded, sharded_dim = LORA_PARTITION_DIM[COLUMN if self.fuse_axis == 0 else ROW]
        for lin in self.linear_names:
            for lora in ("lora_A", "lora_B"):
                name = f"{m}.{fused}.{lora}.weight_{lin}"
                if name not in sharded_state_dicts:
                    continue
                shards = self._ranks(name, sharded_state_dicts)
                full = unshard_tensors(shards, sharded_dim, name=name) if lora == sharded else shards[0]
                original[f"{m}.{lin}.{lora}.weight"] = full.contiguous()
                consumed.append(name)
        # optimum-neuron's layout: one lora_A shared by the fused linears and a fused lora_B (column fusion only).
        shared_a, fused_b = f"{m}.{fused}.lora_A.weight", f"{m}.{fused}.lora_B.weight"
        if shared_a in sharded_state_dicts or fused_b in sharded_state_dicts:
            if self.fuse_axis != 0:
                raise SpecError(f"{shared_a}: a shared LoRA on a row-fused linear cannot be split into its linears")
            if shared_a in sharded_state_dicts:
                a = self._ranks(shared_a, sharded_state_dicts)[0]
                for lin in self.linear_names:
                    original[f"{m}.{lin}.lora_A.weight"] = a.clone()
                consumed.append(shared_a)
            if fused_b in sharded_state_dicts:
                for lin, b in zip(self.linear_names, self._unfuse(fused_b, self._ranks(fused_b, sharded_state_dicts), 0)):
                    original[f"{m}.{lin}.lora_B.weight"] = b.contiguous()
                consumed.append(fused_b)
        return original, consumed
