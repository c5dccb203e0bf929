"""The numbers a Llama-family decoder needs, read once from a Transformers config and validated.

`ArchitectureConfig` is what the model code reads; the Transformers config object itself stays on the model as
``model.config`` (so PEFT, generation utilities and users find what they expect). The architecture switches of the
four supported families are fields here: ``qk_norm`` (Qwen3), per-layer ``sliding_windows`` (Mistral, Qwen3), and
the four Granite multipliers (1.0 / None for the others).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

# Rope types whose frequencies depend on the sequence length at run time; not supported.
DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")


def read_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of a model directory (or of the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"no config.json found at {file}; pass a Transformers model directory")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a JSON object, found {type(data).__name__}")
    return data


@dataclass(frozen=True)
class ArchitectureConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    attention_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    pad_token_id: int | None
    attention_dropout: float
    rope_type: str
    sliding_windows: tuple[int | None, ...]  # one per layer; None = full causal attention
    qk_norm: bool = False
    embedding_multiplier: float = 1.0
    attention_multiplier: float | None = None  # None: head_dim ** -0.5
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim")  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{self.model_type} config: {name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ConfigError(
                f"{self.model_type} config: num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2 != 0:
            raise ConfigError(f"{self.model_type} config: head_dim={self.head_dim} must be even for rotary embeddings")
        if len(self.sliding_windows) != self.num_hidden_layers:
            raise ConfigError(
                f"{self.model_type} config: {len(self.sliding_windows)} attention windows for "
                f"{self.num_hidden_layers} layers"
            )
        if self.rope_type in DYNAMIC_ROPE_TYPES:
            raise ConfigError(
                f"{self.model_type} config: rope_type {self.rope_type!r} changes with the sequence length and is not "
                f"supported; supported: default, linear, llama3, yarn"
            )
        if self.logits_scaling == 0:
            raise ConfigError(f"{self.model_type} config: logits_scaling must not be 0")

    @property
    def attention_scaling(self) -> float:
        """The factor applied to q.k^T (Granite's attention_multiplier, else 1/sqrt(head_dim))."""
        return self.head_dim**-0.5 if self.attention_multiplier is None else self.attention_multiplier


def _sliding_windows(hf_config: Any, num_layers: int, per_layer_types: bool) -> tuple[int | None, ...]:
    window = getattr(hf_config, "sliding_window", None)
    if window is None:
        return (None,) * num_layers
    if not per_layer_types:  # Mistral: one window for every layer
        return (int(window),) * num_layers
    layer_types = getattr(hf_config, "layer_types", None) or ["full_attention"] * num_layers
    return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)


def architecture_config(hf_config: Any, *, qk_norm: bool = False, granite: bool = False,
                        per_layer_sliding: bool = False) -> ArchitectureConfig:  # fmt: skip
    """Read the fields of a Transformers Llama / Mistral / Qwen3 / Granite config."""
    c = hf_config
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    rope = getattr(c, "rope_parameters", None) or {}
    layers = c.num_hidden_layers
    extra: dict[str, Any] = {}
    if granite:
        extra = dict(
            embedding_multiplier=float(c.embedding_multiplier), attention_multiplier=float(c.attention_multiplier),
            residual_multiplier=float(c.residual_multiplier), logits_scaling=float(c.logits_scaling),
        )  # fmt: skip
    return ArchitectureConfig(
        model_type=c.model_type, vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim, rms_norm_eps=float(c.rms_norm_eps),
        hidden_act=c.hidden_act, attention_bias=bool(getattr(c, "attention_bias", False)),
        mlp_bias=bool(getattr(c, "mlp_bias", False)), tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        pad_token_id=getattr(c, "pad_token_id", None), attention_dropout=float(getattr(c, "attention_dropout", 0.0)),
        rope_type=rope.get("rope_type", "default"),
        sliding_windows=_sliding_windows(c, layers, per_layer_sliding), qk_norm=qk_norm, **extra,
    )  # fmt: skip
