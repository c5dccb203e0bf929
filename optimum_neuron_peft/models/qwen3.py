"""Qwen3: Llama with per-head RMSNorms on queries and keys (before rotary), and optional per-layer sliding windows.

``q_norm`` / ``k_norm`` weights have head_dim entries and are replicated on every rank; each rank applies them to
its own heads, so their gradients are summed over the tensor-parallel group in backward.
"""

from __future__ import annotations

from .causal_lm import ParallelForCausalLM


class Qwen3ForCausalLM(ParallelForCausalLM):
    model_type = "qwen3"
    architectures = ("Qwen3ForCausalLM",)
