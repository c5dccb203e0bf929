"""Granite: Llama with four multipliers - embeddings scaled by ``embedding_multiplier``, attention scores by
``attention_multiplier`` (instead of 1/sqrt(head_dim)), both residual branches by ``residual_multiplier``, and
logits divided by ``logits_scaling`` (the loss is computed on the divided logits, as in Transformers)."""

from __future__ import annotations

from typing import Any

from .causal_lm import ParallelForCausalLM
from .config import ArchitectureConfig, architecture_config


class GraniteForCausalLM(ParallelForCausalLM):
    model_type = "granite"
    architectures = ("GraniteForCausalLM",)

    @classmethod
    def architecture_config(cls, hf_config: Any) -> ArchitectureConfig:
        return architecture_config(hf_config, granite=True)
