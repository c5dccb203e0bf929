"""Granite: Llama with four multipliers - embeddings scaled by ``embedding_multiplier``, attention scores by
``attention_multiplier`` (instead of 1/sqrt(head_dim)), both residual branches by ``residual_multiplier``, and
logits divided by ``logits_scaling`` (the loss is computed on the divided logits, as in Transformers)."""

from __future__ import annotations

from .causal_lm import ParallelForCausalLM


class GraniteForCausalLM(ParallelForCausalLM):
    model_type = "granite"
    architectures = ("GraniteForCausalLM",)
