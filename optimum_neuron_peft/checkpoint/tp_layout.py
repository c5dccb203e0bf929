"""Tensor-parallel layout of a Llama-family model (Llama, Mistral, Qwen3, Granite): specs + parameters metadata,
and sharding of its weights.

`plan_layout` reads everything from the parallel plan (`transformations.parallel_plan`): the layout the models of
`optimum_neuron_peft.models` (and optimum-neuron) train with, in short:

    model.embed_tokens.weight                      vocab-parallel, dim 0
    model.layers.<i>.self_attn.qkv_proj.weight_q/k/v  GQAQKVColumnParallelLinearSpec (weight_qkv with fuse_qkv)
    model.layers.<i>.self_attn.o_proj.weight       row parallel, dim 1 (columns permuted by the GQA spec)
    model.layers.<i>.mlp.gate_up_proj.weight       FusedLinearsSpec, column parallel, dim 0 stride 2
    model.layers.<i>.mlp.down_proj.weight          row parallel, dim 1
    norms (Qwen3's q_norm / k_norm too)            replicated
    lm_head.weight                                 column parallel, dim 0 (absent with tie_word_embeddings:
                                                   the model shares embed_tokens.weight, saved once)

It is used to build checkpoints for tests and benchmarks, by `reshard` to shard an original Transformers
directory, and by the distributed saver's tests. Nothing here reads global parallel state.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Iterable, Iterator, Mapping

import torch

from ..errors import ConfigError
from ..transformations import ModelWeightTransformationSpecs, adapt_state_dict
from ..transformations.names import PEFT_WRAPPER_PREFIX, add_adapter_name, split_lora_name
from ..transformations.parallel_plan import (
    FUSED_GROUPS,
    LORA_TARGETS as LORA_TARGETS,
    TIED_LM_HEAD,
    dims_of,
    lora_entries,
    parameter_entries,
)
from ..transformations.plan_specs import build_spec

# LORA_TARGETS and TIED_LM_HEAD are imported from here by tests and tools: they are the plan's.


@dataclasses.dataclass
class ShardingLayout:
    """Specs and metadata of a Llama model at one tp size, split into ``pp_size`` contiguous pipeline stages."""

    num_hidden_layers: int
    tp_size: int
    pp_size: int
    specs: list[ModelWeightTransformationSpecs]
    parameters: dict[str, dict[str, Any]]  # training-model names (no adapter, no base_layer) -> tp attributes
    lora_parameters: dict[str, dict[str, Any]]  # saved LoRA names (no adapter name) -> tp attributes
    tie_word_embeddings: bool = False  # lm_head.weight is embed_tokens.weight: not a parameter of its own

    def stage_of(self, name: str) -> int:
        """Pipeline stage holding parameter ``name``: layers split evenly, embeddings first, norm and head last."""
        parts = name.split(".")
        if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers":
            return int(parts[2]) * self.pp_size // self.num_hidden_layers
        return 0 if "embed_tokens" in parts else self.pp_size - 1

    def metadata(self, pp_rank: int, adapter_name: str | None = None) -> dict[str, Any]:
        """Metadata of one stage in the docs/checkpoint_formats.md section 3 schema, named as in the training model.

        With ``adapter_name``, targeted base parameters are named ``<module>.base_layer.<param>`` and LoRA ones
        ``<module>.lora_A.<adapter>.<param>``, as optimum-neuron writes them, and specs have peft_type "lora".
        """
        lora_modules = {split_lora_name(n)[0] for n in self.lora_parameters}
        params: dict[str, dict[str, Any]] = {}
        for name, entry in self.parameters.items():
            if self.stage_of(name) != pp_rank:
                continue
            module, _, param = name.rpartition(".")
            if adapter_name is not None and module in lora_modules:
                name = f"{module}.base_layer.{param}"
            params[name] = dict(entry)
        if adapter_name is not None:
            for name, entry in self.lora_parameters.items():
                if self.stage_of(name) == pp_rank:
                    params[add_adapter_name(name, adapter_name)] = dict(entry)
        specs = []
        for group in self.specs:
            if self.stage_of(f"{group.module_fully_qualified_name}.x") != pp_rank:
                continue
            entry = group.to_metadata()
            for _, fields in entry["specs"]:
                fields["peft_type"] = "lora" if adapter_name is not None else None
            specs.append(entry)
        return {"parameters": params, "model_weight_transformation_specs": specs}

    def shard(self, state_dict: Mapping[str, Any], tp_rank: int, pp_rank: int | None = None) -> dict[str, torch.Tensor]:
        """This (tp, pp) rank's tensors of original weights (full model or PEFT adapter keys without prefix)."""
        metadata = {**self.parameters, **self.lora_parameters}
        if self.tie_word_embeddings:  # a tied state dict lists the shared tensor twice; it is saved once
            state_dict = {n: t for n, t in state_dict.items() if n != TIED_LM_HEAD}
        local = adapt_state_dict(self.specs, state_dict, tp_rank, metadata)
        local = self._in_model_order(local)
        if pp_rank is None:
            return local
        return {n: t for n, t in local.items() if self.stage_of(n) == pp_rank}

    def _in_model_order(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``local`` ordered by module as the model declares them (``parameters`` is in that order), the way a
        model's ``state_dict()`` and so optimum-neuron's rank files list them; stable within a module."""
        modules: dict[str, int] = {}
        for name in self.parameters:
            modules.setdefault(name.rpartition(".")[0], len(modules))

        def module_index(name: str) -> int:
            split = split_lora_name(name)
            return modules.get(split[0] if split else name.rpartition(".")[0], len(modules))

        return dict(sorted(local.items(), key=lambda item: module_index(item[0])))

    def rank_state_dicts(
        self, state_dict: Mapping[str, Any], pp_split: bool = True
    ) -> Iterator[tuple[tuple[int, int], dict[str, torch.Tensor]]]:
        """Yield ``((tp, pp), tensors)`` for every rank, one at a time."""
        for pp in range(self.pp_size if pp_split else 1):
            for tp in range(self.tp_size):
                yield (tp, pp), self.shard(state_dict, tp, pp if pp_split else None)

    def metadata_per_pp(self, adapter_name: str | None = None) -> dict[int, dict[str, Any]]:
        return {pp: self.metadata(pp, adapter_name) for pp in range(self.pp_size)}


def plan_layout(
    config: Any,
    tp_size: int,
    *,
    pp_size: int = 1,
    kv_size_multiplier: int | None = None,
    fuse_qkv: bool = False,
    lora_target_modules: Iterable[str] | None = None,
    mha_fused_qkv: bool = False,
) -> ShardingLayout:
    """The tensor-parallel layout of the model described by ``config`` (a Transformers config of any of the four
    families, or its dict), built from the parallel plan (`transformations.parallel_plan`).

    ``mha_fused_qkv`` (multi-head attention only): q/k/v fused into one column-parallel ``qkv_proj.weight`` under a
    `FusedLinearsSpec` (stride 3) instead of the GQA layer, as optimum-neuron does for ``fuse_qkv`` when every head
    has its own key/value head.
    """
    try:
        dims = dims_of(config)
    except ConfigError as err:
        raise ConfigError(f"plan_layout: {err}") from None
    if pp_size < 1 or dims.layers < pp_size:
        raise ConfigError(f"plan_layout: pp_size={pp_size} must be between 1 and num_hidden_layers={dims.layers}")
    if mha_fused_qkv and dims.kv_heads != dims.heads:
        raise ConfigError(
            f"plan_layout: mha_fused_qkv needs as many key/value heads as heads, got {dims.kv_heads} and {dims.heads}"
        )
    options = {"kv_size_multiplier": kv_size_multiplier, "fuse_qkv": fuse_qkv, "mha_fused_qkv": mha_fused_qkv}
    group_specs = {fused: build_spec(fused, dims, tp_size, **options) for fused in FUSED_GROUPS}
    specs: list[ModelWeightTransformationSpecs] = []
    for i in range(dims.layers):
        for fused, group in FUSED_GROUPS.items():  # self_attn then mlp, as the model declares them
            spec = copy.deepcopy(group_specs[fused])
            module = f"model.layers.{i}.{group.parent}"
            specs.append(ModelWeightTransformationSpecs(module_fully_qualified_name=module, specs=[spec]))
    params = parameter_entries(config, tp_size, fuse_qkv=fuse_qkv, mha_fused_qkv=mha_fused_qkv)
    try:
        lora = lora_entries(config, tp_size, lora_target_modules or (), mha_fused_qkv=mha_fused_qkv)
    except ConfigError as err:
        raise ConfigError(f"plan_layout: {err}") from None
    return ShardingLayout(dims.layers, tp_size, pp_size, specs, params, lora, dims.tied)




def peft_state_dict_to_plain(adapter_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``base_model.model.<name>.lora_A.weight`` (PEFT's saved keys) -> ``<name>.lora_A.weight``."""
    return {k.removeprefix(PEFT_WRAPPER_PREFIX): v for k, v in adapter_state_dict.items()}


# LoRA parameters of the GQA spec, one per projection; a `FusedLinearsSpec` names them by linear (``weight_gate_proj``).
_GQA_LORA_PARAMS = ("weight_q", "weight_k", "weight_v")


def _fused_lora_b_name(module: str, param: str, fuse_qkv: bool) -> str | None:
    """Name of optimum-neuron's fused lora_B that per-projection ``<module>.lora_B.<param>`` goes into, or None when
    optimum-neuron keeps it per projection (the GQA layer without ``fuse_qkv``)."""
    if param in _GQA_LORA_PARAMS:
        return f"{module}.lora_B.weight_qkv" if fuse_qkv else None
    return f"{module}.lora_B.weight"  # a column-fused linear: [B_0_r ; B_1_r ; ...]


def to_optimum_neuron_lora(local: Mapping[str, torch.Tensor], fuse_qkv: bool = False) -> dict[str, torch.Tensor]:
    """Our per-projection LoRA tensors of one rank -> optimum-neuron's layout: one ``lora_A.weight`` shared by the
    fused projections (taken from the first; the originals must all be equal) and, for a column-fused linear
    (gate_up_proj, an MHA qkv_proj), a fused ``lora_B.weight`` = [B_0_r ; B_1_r ; ...]. The GQA lora_B stays per
    projection (``lora_B.weight_q/k/v``), or is ``lora_B.weight_qkv`` = [B_q_r ; B_k_r ; B_v_r] with ``fuse_qkv``."""
    out: dict[str, torch.Tensor] = {}
    fused_b: dict[str, list[torch.Tensor]] = {}
    for name, tensor in local.items():
        split = split_lora_name(name)
        if split is None or split[2] == "weight":
            out[name] = tensor
            continue
        module, lora, param = split
        if lora == "lora_A":
            shared = f"{module}.lora_A.weight"
            if shared in out and not torch.equal(out[shared], tensor):
                raise ConfigError(f"{name}: optimum-neuron shares one lora_A per fused module; the originals differ")
            out.setdefault(shared, tensor)
        elif (fused := _fused_lora_b_name(module, param, fuse_qkv)) is not None:
            out.setdefault(fused, None)  # keeps the model's parameter order, as the saved state dict has it
            fused_b.setdefault(fused, []).append(tensor)
        else:
            out[name] = tensor
    for name, pieces in fused_b.items():
        out[name] = torch.cat(pieces, dim=0)
    return out


def optimum_neuron_lora_metadata(metadata: Mapping[str, Any], adapter_name: str, fuse_qkv: bool = False) -> dict[str, Any]:
    """Stage metadata of ours -> optimum-neuron's LoRA naming (shared lora_A, fused lora_B; `to_optimum_neuron_lora`)."""
    params: dict[str, Any] = {}
    for name, entry in metadata["parameters"].items():
        parts = name.split(".")
        if len(parts) > 3 and parts[-3] in ("lora_A", "lora_B") and parts[-1].startswith("weight_"):
            module = ".".join(parts[:-3])
            if parts[-3] == "lora_A":
                params[f"{module}.lora_A.{adapter_name}.weight"] = {"tensor_model_parallel": False}
                continue
            fused = _fused_lora_b_name(module, parts[-1], fuse_qkv)
            if fused is not None:
                fused = add_adapter_name(fused, adapter_name)
                # A fused GQA weight_qkv is recorded as not tensor-parallel (the quirk of the base layer's); a
                # column-fused lora_B with stride 1 (the reference sample's gate_up_proj).
                quirk = {"tensor_model_parallel": False} if fused.endswith("weight_qkv") else dict(entry, partition_stride=1)
                params[fused] = quirk
                continue
        params[name] = entry
    return {"parameters": params, "model_weight_transformation_specs": metadata["model_weight_transformation_specs"]}


def merge_adapter_metadata(per_adapter: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One stage's metadata listing the parameters of every adapter of the model, as optimum-neuron writes it into
    each adapter's files (``create_parameter_metadata`` of the whole PEFT model)."""
    per_adapter = list(per_adapter)
    params: dict[str, Any] = {}
    for metadata in per_adapter:
        params.update(metadata["parameters"])
    return {"parameters": params, "model_weight_transformation_specs": per_adapter[0]["model_weight_transformation_specs"]}
