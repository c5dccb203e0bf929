"""Tensor-parallel layout of a Llama-family model: specs + parameters metadata, and sharding of its weights.

This is the layout the custom Llama of `optimum_neuron_peft.models` (and optimum-neuron) trains with:

    model.embed_tokens.weight                      vocab-parallel, dim 0
    model.layers.<i>.self_attn.qkv_proj.weight_q/k/v  GQAQKVColumnParallelLinearSpec (weight_qkv with fuse_qkv)
    model.layers.<i>.self_attn.o_proj.weight       row parallel, dim 1 (columns permuted by the GQA spec)
    model.layers.<i>.mlp.gate_up_proj.weight       FusedLinearsSpec, column parallel, dim 0 stride 2
    model.layers.<i>.mlp.down_proj.weight          row parallel, dim 1
    norms                                          replicated
    lm_head.weight                                 column parallel, dim 0 (absent with tie_word_embeddings:
                                                   the model shares embed_tokens.weight, saved once)

It is used to build checkpoints for tests and benchmarks, by `reshard` to shard an original Transformers
directory, and by the distributed saver's tests. Nothing here reads global parallel state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Iterator, Mapping

import torch

from ..errors import ConfigError
from ..transformations import (
    FusedLinearsSpec,
    GQAQKVColumnParallelLinearSpec,
    ModelWeightTransformationSpecs,
    adapt_state_dict,
)
from ..transformations.names import PEFT_WRAPPER_PREFIX, add_adapter_name, split_lora_name

_REPLICATED = {"tensor_model_parallel": False}


def _sharded(dim: int, tp_size: int, stride: int = 1) -> dict[str, Any]:
    return {"tensor_model_parallel": True, "partition_dim": dim, "partition_stride": stride, "num_partitions": tp_size}


def _get(config: Any, key: str, default: Any = None) -> Any:
    return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)


@dataclasses.dataclass
class LlamaShardingLayout:
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


TIED_LM_HEAD = "lm_head.weight"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_layout(
    config: Any,
    tp_size: int,
    *,
    pp_size: int = 1,
    kv_size_multiplier: int | None = None,
    fuse_qkv: bool = False,
    lora_target_modules: Iterable[str] | None = None,
    mha_fused_qkv: bool = False,
) -> LlamaShardingLayout:
    """The tensor-parallel layout of the Llama model described by ``config`` (a LlamaConfig or its dict).

    ``mha_fused_qkv`` (multi-head attention only): q/k/v fused into one column-parallel ``qkv_proj.weight`` under a
    `FusedLinearsSpec` (stride 3) instead of the GQA layer, as optimum-neuron does for ``fuse_qkv`` when every head
    has its own key/value head.
    """
    hidden = _get(config, "hidden_size")
    layers = _get(config, "num_hidden_layers")
    heads = _get(config, "num_attention_heads")
    kv_heads = _get(config, "num_key_value_heads") or heads
    head_dim = _get(config, "head_dim") or hidden // heads
    intermediate = _get(config, "intermediate_size")
    attention_bias = bool(_get(config, "attention_bias", False))
    if _get(config, "mlp_bias", False):
        raise ConfigError("llama_layout: mlp_bias=True is not supported")
    if pp_size < 1 or layers < pp_size:
        raise ConfigError(f"llama_layout: pp_size={pp_size} must be between 1 and num_hidden_layers={layers}")
    tied = bool(_get(config, "tie_word_embeddings", False))
    targets = set(lora_target_modules or ())
    unknown = targets - set(LORA_TARGETS)
    if unknown:
        raise ConfigError(f"llama_layout: LoRA target modules {sorted(unknown)} are not linears of Llama {LORA_TARGETS}")
    if mha_fused_qkv and kv_heads != heads:
        raise ConfigError(f"llama_layout: mha_fused_qkv needs as many key/value heads as heads, got {kv_heads} and {heads}")

    specs: list[ModelWeightTransformationSpecs] = []
    params: dict[str, dict[str, Any]] = {"model.embed_tokens.weight": _sharded(0, tp_size)}
    lora: dict[str, dict[str, Any]] = {}
    for i in range(layers):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        fused = FusedLinearsSpec("gate_up_proj", ["gate_proj", "up_proj"], False, 0, [intermediate] * 2, tp_size=tp_size)
        qkv_params = ["weight", "bias"] if attention_bias else ["weight"]
        if mha_fused_qkv:
            qkv = FusedLinearsSpec(
                "qkv_proj", ["q_proj", "k_proj", "v_proj"], attention_bias, 0, [heads * head_dim] * 3, tp_size=tp_size
            )
            for p in qkv_params:
                params[f"{attn}.qkv_proj.{p}"] = _sharded(0, tp_size, stride=3)
        else:
            qkv = GQAQKVColumnParallelLinearSpec.create(
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, tp_size=tp_size,
                kv_size_multiplier=kv_size_multiplier, fuse_qkv=fuse_qkv, bias=attention_bias,
            )
            for p in qkv_params:
                for s in (["qkv"] if fuse_qkv else ["q", "k", "v"]):
                    params[f"{attn}.qkv_proj.{p}_{s}"] = _sharded(0, tp_size)
        specs.append(ModelWeightTransformationSpecs(module_fully_qualified_name=attn, specs=[qkv]))
        specs.append(ModelWeightTransformationSpecs(module_fully_qualified_name=mlp, specs=[fused]))
        params[f"{attn}.o_proj.weight"] = _sharded(1, tp_size)
        if attention_bias:
            params[f"{attn}.o_proj.bias"] = dict(_REPLICATED)
        params[f"{mlp}.gate_up_proj.weight"] = _sharded(0, tp_size, stride=2)
        params[f"{mlp}.down_proj.weight"] = _sharded(1, tp_size)
        params[f"model.layers.{i}.input_layernorm.weight"] = dict(_REPLICATED)
        params[f"model.layers.{i}.post_attention_layernorm.weight"] = dict(_REPLICATED)
        for s, proj in zip("qkv", ("q_proj", "k_proj", "v_proj")):
            if proj in targets:
                suffix = proj if mha_fused_qkv else s  # FusedLinearsSpec names LoRA by linear, the GQA spec by q/k/v
                lora[f"{attn}.qkv_proj.lora_A.weight_{suffix}"] = dict(_REPLICATED)
                lora[f"{attn}.qkv_proj.lora_B.weight_{suffix}"] = _sharded(0, tp_size)
        for proj in ("gate_proj", "up_proj"):
            if proj in targets:
                lora[f"{mlp}.gate_up_proj.lora_A.weight_{proj}"] = dict(_REPLICATED)
                lora[f"{mlp}.gate_up_proj.lora_B.weight_{proj}"] = _sharded(0, tp_size)
        for module, target in ((f"{attn}.o_proj", "o_proj"), (f"{mlp}.down_proj", "down_proj")):
            if target in targets:
                lora[f"{module}.lora_A.weight"] = _sharded(1, tp_size)
                lora[f"{module}.lora_B.weight"] = dict(_REPLICATED)
    params["model.norm.weight"] = dict(_REPLICATED)
    if not tied:  # tied: Transformers ties lm_head to embed_tokens itself when loading
        params[TIED_LM_HEAD] = _sharded(0, tp_size)
    return LlamaShardingLayout(layers, tp_size, pp_size, specs, params, lora, tied)


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
