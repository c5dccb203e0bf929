"""Build a tiny random Llama-family model locally and save it as a Transformers directory (no network)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class TinyModelSpec:
    vocab_size: int = 64
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 1  # fewer kv heads than tp=2: the GQA layer replicates them
    max_position_embeddings: int = 128
    # Larger than Transformers' 0.02 so that, as in a trained model, the frozen final norm and lm_head can produce
    # confident logits: with 0.02 the logits of a 64-wide model stay within about +-1.3 and no LoRA can fix that.
    initializer_range: float = 0.3
    seed: int = 0


def build_tiny_llama(output_dir: str | Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Save a randomly initialised ``LlamaForCausalLM`` (safetensors) and return its directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        initializer_range=spec.initializer_range,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir, safe_serialization=True)
    return output_dir
