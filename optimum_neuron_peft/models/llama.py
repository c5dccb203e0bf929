"""Llama (1, 2, 3, 3.1 with its "llama3" rope scaling): the base architecture, no switch set."""

from __future__ import annotations

from .causal_lm import ParallelForCausalLM


class LlamaForCausalLM(ParallelForCausalLM):
    model_type = "llama"
    architectures = ("LlamaForCausalLM",)
