"""Tensor-parallel Llama-family causal LMs (Llama, Mistral, Qwen3, Granite) loading Transformers checkpoints."""

from .auto import ARCHITECTURE_REGISTRY, MODEL_REGISTRY, AutoModelForCausalLM, model_class_for, register
from .causal_lm import ParallelDecoderModel, ParallelForCausalLM
from .config import ArchitectureConfig
from .granite import GraniteForCausalLM
from .llama import LlamaForCausalLM
from .loading import checkpoint_weight_map, load_checkpoint
from .mistral import MistralForCausalLM
from .plan import ParallelPlan
from .qwen3 import Qwen3ForCausalLM

__all__ = [
    "ARCHITECTURE_REGISTRY",
    "ArchitectureConfig",
    "AutoModelForCausalLM",
    "GraniteForCausalLM",
    "LlamaForCausalLM",
    "MODEL_REGISTRY",
    "MistralForCausalLM",
    "ParallelDecoderModel",
    "ParallelForCausalLM",
    "ParallelPlan",
    "Qwen3ForCausalLM",
    "checkpoint_weight_map",
    "load_checkpoint",
    "model_class_for",
    "register",
]
