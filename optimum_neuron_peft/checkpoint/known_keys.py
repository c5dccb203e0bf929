"""The state-dict keys Transformers expects for an architecture we know, from ``config.json`` alone; imports no torch.

`loadability.expected_model_keys` builds the model on the meta device to ask Transformers itself, which costs
importing torch and Transformers (~4 s on a small VM: more than copying a 1.5 GB checkpoint). For the
architectures below the key set is a plain function of a few config fields, so the torch-free engine takes it from
here; tests pin it against Transformers' own ``state_dict()`` for every field that changes it. Any config this
module does not vouch for (another model type or architecture, a field it does not know the effect of) gives
None, and the keys come from Transformers as before.
"""

from __future__ import annotations

from typing import Any

# The LlamaConfig fields that change the keys of ``AutoModelForCausalLM`` (LlamaForCausalLM, whatever
# ``architectures`` says: `loadability` builds it from ``model_type``), all False by default. Transformers >=5.23,<6
# (pyproject.toml); tests/checkpoint/test_loadability.py pins each against its ``state_dict()``.
_BOOL_FIELDS = ("tie_word_embeddings", "attention_bias", "mlp_bias")
_UNKNOWN_EFFECT = ("quantization_config",)  # may change the modules: left to Transformers


def expected_keys_from_config(config: Any) -> tuple[set[str], set[str]] | None:
    """``(required, allowed)`` as `loadability.expected_model_keys` gives them, or None when not known here."""
    if not isinstance(config, dict) or config.get("model_type") != "llama":
        return None
    if any(name in config for name in _UNKNOWN_EFFECT):
        return None
    layers = config.get("num_hidden_layers", 32)  # LlamaConfig's default
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 0:
        return None
    flags = {name: config.get(name, False) for name in _BOOL_FIELDS}
    if not all(isinstance(v, bool) for v in flags.values()):
        return None
    return _llama(layers, **flags)


def _llama(layers: int, *, tie_word_embeddings: bool, attention_bias: bool, mlp_bias: bool) -> tuple[set[str], set[str]]:
    keys = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(layers):
        layer = f"model.layers.{i}"
        keys |= {f"{layer}.input_layernorm.weight", f"{layer}.post_attention_layernorm.weight"}
        for module, bias in [*((f"self_attn.{p}_proj", attention_bias) for p in "qkvo"),
                             *((f"mlp.{p}_proj", mlp_bias) for p in ("gate", "up", "down"))]:  # fmt: skip
            keys.add(f"{layer}.{module}.weight")
            if bias:
                keys.add(f"{layer}.{module}.bias")
    allowed = keys | {"lm_head.weight"}
    # A tied lm_head is the embedding's parameter: in the state dict, not owned, re-tied on load.
    return (keys if tie_word_embeddings else allowed), allowed
