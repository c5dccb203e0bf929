"""PEFT's API for our tensor-parallel models: `get_peft_model`, `PeftModel.from_pretrained`, sharded save, merge.

`PeftModel` / `PeftModelForCausalLM` are PEFT's own classes with four changes: configs are adapted to the custom
model on the way in (`adapt_peft_config_for_model`) and restored to original names on the way out; loading a
vanilla PEFT adapter converts its tensors with the model's specs (``adapt_state_dict``: bit-exact slicing);
``save_pretrained`` writes the sharded adapter checkpoint (every rank its tensors, metadata and
``adapter_config.json`` in original names), or with ``consolidated=True`` a vanilla PEFT adapter directory.
Merging and unmerging are PEFT's (`merge_adapter` / `unmerge_adapter`), run by our layers on the local shards.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import peft
import torch
import torch.distributed as dist
from peft import LoraConfig
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..parallel import TensorParallel
from ..transformations import (
    adapt_state_dict,
    create_parameter_metadata,
    specialize_transformation_specs_for_model,
    to_original_weights,
)
from ..transformations.metadata import parameter_metadata
from ..transformations.names import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    PEFT_WRAPPER_PREFIX,
    get_adapter_name,
    remove_adapter_name,
    remove_base_layer,
)
from ..utils.sharded_writer import sharded_writer
from .config import adapt_peft_config_for_model, to_original_peft_config_for_model, unwrap_model
from .layers import ParallelLoraLayer


# -- state dicts ------------------------------------------------------------------------------------------------


def lora_layers(model: nn.Module) -> list[ParallelLoraLayer]:
    return [m for m in model.modules() if isinstance(m, ParallelLoraLayer)]


def restore_lora_parallel_attributes(model: nn.Module) -> None:
    """Put back the tensor-parallel attributes PEFT drops when it re-creates adapter parameters (its fp32 upcast of
    adapters on a bf16/fp16 base); see `ParallelLoraLayer.restore_parallel_attributes`."""
    for layer in lora_layers(model):
        layer.restore_parallel_attributes()


def model_tp(model: nn.Module) -> TensorParallel:
    """The `TensorParallel` of the model's LoRA layers (all share one)."""
    layers = lora_layers(model)
    if not layers:
        raise ConfigError("the model has no tensor-parallel LoRA layer; build it with optimum_neuron_peft.peft.get_peft_model")
    return layers[0].tp


def local_adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """This rank's tensors of one adapter, named like the spec names: no ``base_model.model.``, no adapter name."""
    inner = unwrap_model(model)
    return {
        remove_adapter_name(name): param.detach()
        for name, param in inner.named_parameters()
        if get_adapter_name(name) == adapter_name
    }


def adapter_metadata(model: nn.Module, adapter_name: str = "default") -> dict[str, Any]:
    """docs/checkpoint_formats.md section 3 metadata of the inner model: every parameter with its adapter name, only this adapter's
    LoRA parameters, and the specs (with ``peft_type``)."""
    inner = unwrap_model(model)
    specialize_transformation_specs_for_model(inner)
    names = [n for n, _ in inner.named_parameters() if get_adapter_name(n) in (None, adapter_name)]
    return create_parameter_metadata(inner, names)


def consolidate_adapter(
    per_rank_state_dicts: list[Mapping[str, torch.Tensor]], metadata: Mapping[str, Any], adapter_name: str = "default"
) -> dict[str, torch.Tensor]:
    """Per-rank local adapter tensors (from `local_adapter_state_dict`) -> the adapter in ORIGINAL names."""
    from ..transformations import parse_metadata

    parameters, specs = parse_metadata(metadata)
    names = per_rank_state_dicts[0].keys()
    sharded = {name: [sd[name] for sd in per_rank_state_dicts] for name in names}
    return to_original_weights(specs, sharded, parameters, adapter_name=adapter_name)


def local_adapter_tensors(
    model: nn.Module, original: Mapping[str, torch.Tensor], adapter_name: str
) -> dict[str, tuple[nn.Parameter, torch.Tensor]]:
    """This rank's slices of tensors given in ORIGINAL names (no ``base_model.model.``, no adapter name), by local
    name, each with the parameter it belongs to: what the adapter's parameters, or any state shaped like them (the
    optimizer's moments), hold on this rank.

    Bit-exact: only slicing and permutations. Every LoRA parameter of the adapter must be covered, and every tensor
    must find its parameter. Base weights saved with the adapter (PEFT saves ``embed_tokens`` / ``lm_head`` as
    ``<module>.base_layer.weight`` when they are targeted) map to the base layers.
    """
    inner = unwrap_model(model)
    specialize_transformation_specs_for_model(inner)
    tp = model_tp(inner)
    metadata = {n: parameter_metadata(p) for n, p in inner.named_parameters()}
    renamed = {remove_base_layer(k): v for k, v in original.items()}
    local = adapt_state_dict(inner, renamed, tp.rank, parameters_metadata=metadata, strict=True)
    params = {}
    for name, param in inner.named_parameters():
        adapter = get_adapter_name(name)
        if adapter == adapter_name:
            params[remove_adapter_name(name)] = param
        elif adapter is None:
            params.setdefault(remove_base_layer(name), param)
    expected = {remove_adapter_name(n) for n, _ in inner.named_parameters() if get_adapter_name(n) == adapter_name}
    unexpected = sorted(set(local) - set(params))
    missing = sorted(expected - set(local))
    if unexpected or missing:
        raise CheckpointError(
            f"adapter {adapter_name!r}: the saved adapter does not match the model's LoRA layers; "
            f"missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})"
        )
    out = {}
    for name, tensor in local.items():
        param = params[name]
        if tuple(param.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{name}: the adapter gives shape {tuple(tensor.shape)}, the model {tuple(param.shape)}")
        out[name] = (param, tensor)
    return out


def load_original_adapter_weights(model: nn.Module, original: Mapping[str, torch.Tensor], adapter_name: str) -> None:
    """Copy an adapter given in ORIGINAL names into this rank's shards (see `local_adapter_tensors`)."""
    with torch.no_grad():
        for param, tensor in local_adapter_tensors(model, original, adapter_name).values():
            param.copy_(tensor)


def saved_embedding_layers(model: nn.Module, config: Any) -> list[str]:
    """Custom names of the embedding layers whose base weights vanilla PEFT saves with the adapter (PEFT's
    ``save_embedding_layers="auto"`` when ``embed_tokens`` / ``lm_head`` are targeted)."""
    from peft.utils.constants import EMBEDDING_LAYER_NAMES

    inner = unwrap_model(model)
    out = []
    for layer in lora_layers(inner):
        name = next(n for n, m in inner.named_modules() if m is layer)
        if name.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES and _targets(config, name):
            out.append(name)
    return out


def _targets(config: Any, name: str) -> bool:
    from peft.tuners.tuners_utils import check_target_module_exists

    return bool(check_target_module_exists(config, name))


def read_vanilla_adapter(adapter_dir: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A vanilla PEFT adapter directory -> (its config, its tensors in original names)."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS_NAME
    if not (adapter_dir / ADAPTER_CONFIG_NAME).is_file() or not weights.is_file():
        raise CheckpointError(
            f"{adapter_dir}: expected a PEFT adapter directory with {ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME}"
        )
    config = peft.PeftConfig.from_pretrained(str(adapter_dir))
    tensors = {k.removeprefix(PEFT_WRAPPER_PREFIX): v for k, v in load_file(str(weights)).items()}
    return config, tensors


# -- the model classes ------------------------------------------------------------------------------------------


class _ParallelPeftMixin:
    """Overrides shared by our PeftModel classes (see module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        restore_lora_parallel_attributes(self)

    def add_adapter(self, adapter_name: str, peft_config: Any, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:  # fmt: skip
        adapted = adapt_peft_config_for_model(self.base_model.model, peft_config)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys did not match")
            super().add_adapter(adapter_name, adapted, low_cpu_mem_usage=low_cpu_mem_usage,
                                autocast_adapter_dtype=autocast_adapter_dtype)  # fmt: skip
        restore_lora_parallel_attributes(self)

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False, **kwargs: Any):
        config, tensors = read_vanilla_adapter(model_id)
        config.inference_mode = not is_trainable
        self.add_adapter(adapter_name, config)
        load_original_adapter_weights(self, tensors, adapter_name)
        if not is_trainable:
            for name, param in self.named_parameters():
                if get_adapter_name(name) == adapter_name:
                    param.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: Any = None, **kwargs: Any) -> "PeftModel":  # fmt: skip
        """Load a vanilla PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``, original
        module names) into the tensor-parallel ``model``; bit-exact."""
        saved_config, tensors = read_vanilla_adapter(model_id)
        config = config if config is not None else saved_config
        config.inference_mode = not is_trainable
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
        load_original_adapter_weights(peft_model, tensors, adapter_name)
        if not is_trainable:
            peft_model.eval()
            for name, param in peft_model.named_parameters():
                if get_adapter_name(name) == adapter_name:
                    param.requires_grad_(False)
        return peft_model

    def original_peft_config(self, adapter_name: str = "default") -> LoraConfig:
        return to_original_peft_config_for_model(self.base_model.model, self.peft_config[adapter_name])

    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None,
                        consolidated: bool = False, **kwargs: Any) -> None:  # fmt: skip
        """Sharded adapter checkpoint (collective: every tp rank must call it), or a vanilla PEFT adapter directory
        written by tp rank 0 with ``consolidated=True``. Adapters other than "default" go to ``<dir>/<name>``."""
        adapters = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        ordered = sorted(adapters, key=lambda a: a != "default")  # the root first: its atomic rename replaces it
        for adapter in ordered:
            directory = Path(save_directory) if adapter == "default" else Path(save_directory) / adapter
            if consolidated:
                self._save_consolidated(directory, adapter)
            else:
                self._save_sharded(directory, adapter)

    def _save_sharded(self, directory: Path, adapter: str) -> None:
        from ..parallel import get_data_parallel_rank

        tp = model_tp(self)
        if get_data_parallel_rank() != 0:
            return  # data-parallel replicas hold the same shards; replica 0 writes them
        local = {k: v.contiguous() for k, v in local_adapter_state_dict(self, adapter).items()}
        metadata = adapter_metadata(self, adapter)
        config = self.original_peft_config(adapter).to_dict()
        writer = sharded_writer()
        if tp.is_parallel or (dist.is_available() and dist.is_initialized()):
            writer.save_sharded_checkpoint_distributed(
                directory, local, metadata, tp_rank=tp.rank, tp_size=tp.size, group=tp.group, adapter_name=adapter,
                adapter_config=_jsonable(config),
            )  # fmt: skip
        else:
            writer.save_sharded_checkpoint(
                directory, None, None,
                adapters={adapter: writer.AdapterShards({(0, 0): local}, {0: metadata}, _jsonable(config))},
            )

    def consolidated_adapter_state_dict(self, adapter: str = "default") -> dict[str, torch.Tensor]:
        """The adapter in original names, gathered from every tp rank (collective)."""
        tp = model_tp(self)
        local = {k: v.contiguous() for k, v in local_adapter_state_dict(self, adapter).items()}
        inner = unwrap_model(self)
        embeddings = saved_embedding_layers(inner, self.peft_config[adapter])
        for name in embeddings:
            local[f"{name}.weight"] = inner.get_submodule(name).get_base_layer().weight.detach().contiguous()
        if tp.is_parallel:
            gathered: list[Any] = [None] * tp.size
            dist.all_gather_object(gathered, local, group=tp.group)
        else:
            gathered = [local]
        full = {k: v.clone() for k, v in consolidate_adapter(gathered, adapter_metadata(self, adapter), adapter).items()}
        for name in embeddings:
            full[f"{name}.base_layer.weight"] = full.pop(f"{name}.weight")
        return full

    def _save_consolidated(self, directory: Path, adapter: str) -> None:
        from safetensors.torch import save_file

        from ..parallel import get_data_parallel_rank

        tensors = self.consolidated_adapter_state_dict(adapter)
        if model_tp(self).rank != 0 or get_data_parallel_rank() != 0:
            return  # one writer: data-parallel replicas hold the same adapter
        directory.mkdir(parents=True, exist_ok=True)
        partial = directory / f".{ADAPTER_WEIGHTS_NAME}.partial"
        save_file({PEFT_WRAPPER_PREFIX + k: v.contiguous() for k, v in tensors.items()}, str(partial))
        os.replace(partial, directory / ADAPTER_WEIGHTS_NAME)  # atomic: a reader never sees half a file
        self.original_peft_config(adapter).save_pretrained(str(directory))


def _jsonable(config: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(config, default=lambda o: sorted(o) if isinstance(o, (set, frozenset)) else str(o)))


class PeftModel(_ParallelPeftMixin, peft.PeftModel):
    """`peft.PeftModel` for our tensor-parallel custom models."""


def get_peft_model(model: nn.Module, peft_config: Any, adapter_name: str = "default", **kwargs: Any) -> PeftModel:
    """Like `peft.get_peft_model`, for a tensor-parallel custom model and a config in ORIGINAL module names.

    ``peft_config`` may also be {adapter name: config}; the first adapter is the active one. Seed the RNG right
    before this call to get the same initial adapter at every tp size.
    """
    if isinstance(peft_config, dict):
        items = list(peft_config.items())
        if not items:
            raise ConfigError("get_peft_model: the dict of configs is empty")
        peft_model = get_peft_model(model, items[0][1], adapter_name=items[0][0], **kwargs)
        for name, config in items[1:]:
            peft_model.add_adapter(name, config)
        return peft_model
    config = adapt_peft_config_for_model(model, peft_config)
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(model, "name_or_path", None)
    # Always the generic PeftModel: its forward passes arguments through to our model, whose signature differs
    # from Transformers' (PeftModelForCausalLM would pass inputs_embeds, output_attentions...).
    with warnings.catch_warnings():
        # rank/alpha pattern keys name original modules (q_proj...) that fused layers evaluate themselves
        warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys did not match")
        return PeftModel(model, config, adapter_name=adapter_name, **kwargs)


__all__ = [
    "PeftModel",
    "adapter_metadata",
    "consolidate_adapter",
    "get_peft_model",
    "load_original_adapter_weights",
    "local_adapter_state_dict",
    "local_adapter_tensors",
    "read_vanilla_adapter",
]
