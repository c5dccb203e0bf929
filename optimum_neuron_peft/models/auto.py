"""`AutoModelForCausalLM`: pick the tensor-parallel model class from ``config.json`` and load the checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError
from ..parallel import TensorParallel
from ..parallel.state import get_data_parallel_size, get_pipeline_model_parallel_size
from .causal_lm import ParallelForCausalLM
from .config import read_config_json
from .granite import GraniteForCausalLM
from .llama import LlamaForCausalLM
from .loading import load_checkpoint
from .mistral import MistralForCausalLM
from .plan import ParallelPlan
from .qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[ParallelForCausalLM]] = {}  # model_type -> class
ARCHITECTURE_REGISTRY: dict[str, type[ParallelForCausalLM]] = {}  # Transformers class name -> class


def register(cls: type[ParallelForCausalLM]) -> type[ParallelForCausalLM]:
    """Add a model class under its ``model_type`` and ``architectures``; a name already taken is refused."""
    if cls.model_type in MODEL_REGISTRY and MODEL_REGISTRY[cls.model_type] is not cls:
        raise ConfigError(f"model_type {cls.model_type!r} is already registered to {MODEL_REGISTRY[cls.model_type].__name__}")
    for arch in cls.architectures:
        if arch in ARCHITECTURE_REGISTRY and ARCHITECTURE_REGISTRY[arch] is not cls:
            raise ConfigError(f"architecture {arch!r} is already registered to {ARCHITECTURE_REGISTRY[arch].__name__}")
    MODEL_REGISTRY[cls.model_type] = cls
    ARCHITECTURE_REGISTRY.update({arch: cls for arch in cls.architectures})
    return cls


for _cls in (LlamaForCausalLM, MistralForCausalLM, Qwen3ForCausalLM, GraniteForCausalLM):
    register(_cls)


def model_class_for(config: dict[str, Any], where: str = "config.json") -> type[ParallelForCausalLM]:
    """The class for a config dict: by ``model_type``, else by a name in ``architectures``."""
    model_type, architectures = config.get("model_type"), config.get("architectures") or []
    if model_type in MODEL_REGISTRY:
        return MODEL_REGISTRY[model_type]
    for arch in architectures:
        if arch in ARCHITECTURE_REGISTRY:
            return ARCHITECTURE_REGISTRY[arch]
    raise ConfigError(
        f"{where}: unsupported architecture (model_type={model_type!r}, architectures={architectures}); supported "
        f"model types: {sorted(MODEL_REGISTRY)} (architectures {sorted(ARCHITECTURE_REGISTRY)})"
    )


def resolve_tensor_parallel(tp: TensorParallel | None = None) -> TensorParallel:
    """This process's tensor-parallel layout, checked against the world size (only tp x dp may fill it)."""
    tp = TensorParallel.from_state() if tp is None else tp
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        pp, dp = get_pipeline_model_parallel_size(), get_data_parallel_size()
        if pp != 1:
            raise ConfigError(f"pipeline parallelism (size {pp}) is not supported by these models; use pipeline size 1")
        if tp.size * dp != world:
            raise ConfigError(
                f"tensor-parallel size {tp.size} x data-parallel size {dp} does not match the world size {world}; call "
                f"optimum_neuron_peft.parallel.initialize_model_parallel(tensor_model_parallel_size=...) with a size "
                f"whose multiple is {world} before loading the model"
            )
    return tp


def _dtype(torch_dtype: Any, hf_config: Any) -> torch.dtype:
    value = torch_dtype
    if value is None or value == "auto":
        value = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.float32
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ConfigError(f"torch_dtype must be a floating point torch.dtype (or its name), got {torch_dtype!r}")
    return value


class AutoModelForCausalLM:
    """Factory of the tensor-parallel causal LMs (Llama, Mistral, Qwen3, Granite)."""

    @staticmethod
    def from_config(hf_config: Any, plan: ParallelPlan | None = None) -> ParallelForCausalLM:
        """A randomly initialized model for a Transformers config (tests, from-scratch training)."""
        cls = model_class_for(hf_config.to_dict(), where=f"{type(hf_config).__name__}")
        return cls(hf_config, plan or ParallelPlan(resolve_tensor_parallel()))

    @staticmethod
    def from_pretrained(
        path: str | os.PathLike,
        torch_dtype: torch.dtype | str | None = None,
        fuse_qkv: bool = False,
        kv_size_multiplier: int | None = None,
        sequence_parallel: bool = False,
        kv_layout: str = "tiled",
        tp: TensorParallel | None = None,
    ) -> ParallelForCausalLM:
        """Load a Transformers model directory (``config.json`` + safetensors) for this rank.

        ``tp`` defaults to the initialized parallel state (size 1 without one). ``torch_dtype`` None/"auto" uses the
        config's dtype (float32 when absent). Raises `ConfigError` for an unsupported architecture or head counts the
        layout cannot shard, `CheckpointError` for missing / misshapen / unexpected tensors.
        """
        from transformers import AutoConfig

        cls = model_class_for(read_config_json(path), where=str(Path(path) / "config.json"))
        hf_config = AutoConfig.from_pretrained(str(path))
        dtype = _dtype(torch_dtype, hf_config)
        plan = ParallelPlan(
            resolve_tensor_parallel(tp), sequence_parallel=sequence_parallel, fuse_qkv=fuse_qkv,
            kv_size_multiplier=kv_size_multiplier, kv_layout=kv_layout, dtype=dtype, device="meta", initialize=False,
        )  # fmt: skip
        model = cls(hf_config, plan)
        load_checkpoint(model, path, dtype)
        return model

