"""Mistral: Llama with a sliding attention window on every layer (``config.sliding_window``, None = off).

The window is applied exactly as Transformers does (a key is visible when ``key > query - window``); a window at
least as long as the sequence is plain causal attention.
"""

from __future__ import annotations

from typing import Any

from .causal_lm import ParallelForCausalLM
from .config import ArchitectureConfig, architecture_config


class MistralForCausalLM(ParallelForCausalLM):
    model_type = "mistral"
    architectures = ("MistralForCausalLM",)

    @classmethod
    def architecture_config(cls, hf_config: Any) -> ArchitectureConfig:
        return architecture_config(hf_config)
