"""Mistral: Llama with a sliding attention window on every layer (``config.sliding_window``, None = off).

The window is applied exactly as Transformers does (a key is visible when ``key > query - window``); a window at
least as long as the sequence is plain causal attention.
"""

from __future__ import annotations

from .causal_lm import ParallelForCausalLM


class MistralForCausalLM(ParallelForCausalLM):
    model_type = "mistral"
    architectures = ("MistralForCausalLM",)
