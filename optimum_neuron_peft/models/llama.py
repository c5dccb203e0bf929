"""Llama (1, 2, 3, 3.1 with its "llama3" rope scaling): the base architecture, no switch set."""

from __future__ import annotations

from typing import Any

from .causal_lm import ParallelForCausalLM
from .config import ArchitectureConfig, architecture_config


class LlamaForCausalLM(ParallelForCausalLM):
    model_type = "llama"
    architectures = ("LlamaForCausalLM",)

    @classmethod
    def architecture_config(cls, hf_config: Any) -> ArchitectureConfig:
        return architecture_config(hf_config)
