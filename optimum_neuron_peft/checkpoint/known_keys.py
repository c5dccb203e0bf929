"""The state-dict keys Transformers (and PEFT, for a LoRA adapter) expects for an architecture we know, from
``config.json`` (and ``adapter_config.json``) alone; imports no torch.

`loadability.expected_model_keys` builds the model on the meta device to ask Transformers itself, which costs
importing torch and Transformers (~4 s on a small VM: more than copying a 1.5 GB checkpoint). For the
architectures below the key set is a plain function of a few config fields, so the torch-free engine takes it from
here; tests pin it against Transformers' own ``state_dict()`` for every field that changes it. Any config this
module does not vouch for (another model type or architecture, a field it does not know the effect of) gives
None, and the keys come from Transformers as before.
"""

from __future__ import annotations

import re
from typing import Any

from ..transformations.names import PEFT_WRAPPER_PREFIX
from ..transformations.parallel_plan import COLUMN, LAYER, MODULE_PLAN, ROW, TIED_LM_HEAD

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
    """The parameters of the parallel plan's table (`transformations.parallel_plan.MODULE_PLAN`, the one list of a
    Llama-family model's modules) that Llama has: no family-only module, biases where the config flag says so."""
    flags = {"attention_bias": attention_bias, "mlp_bias": mlp_bias}
    allowed: set[str] = set()
    for name, plan in MODULE_PLAN.items():
        if plan.family_flag is not None:
            continue
        for module in [name.replace("<i>", str(i)) for i in range(layers)] if LAYER in name else [name]:
            allowed.add(f"{module}.weight")
            if plan.bias is not None and flags[plan.bias]:
                allowed.add(f"{module}.bias")
    # A tied lm_head is the embedding's parameter: in the state dict, not owned, re-tied on load.
    return (allowed - {TIED_LM_HEAD} if tie_word_embeddings else allowed), allowed


# ---------------------------------------------------------------------------------------------------------------------
# LoRA adapters: the keys of ``get_peft_model_state_dict`` (what ``PeftModel.from_pretrained`` loads)

_PROJECTIONS = tuple(
    name.removeprefix(f"{LAYER}.") for name, plan in MODULE_PLAN.items() if LAYER in name and plan.parallel in (COLUMN, ROW)
)  # the decoder layer's linears, from the plan
# adapter_config fields that do not change which keys PEFT saves (values, init and scaling only).
_NEUTRAL_FIELDS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "r", "lora_alpha", "lora_dropout", "fan_in_fan_out", "use_rslora", "init_lora_weights", "rank_pattern",
    "alpha_pattern", "megatron_core", "loftq_config", "qalora_group_size", "target_modules",
})  # fmt: skip
# Fields that change the modules or keys: derived here only at PEFT's default (peft 0.21; tests pin it).
_DEFAULT_FIELDS = {
    "exclude_modules": None, "bias": "none", "modules_to_save": None, "layers_to_transform": None,
    "layers_pattern": None, "megatron_config": None, "trainable_token_indices": None, "eva_config": None,
    "corda_config": None, "lora_ga_config": None, "use_dora": False, "velora_config": None,
    "alora_invocation_tokens": None, "use_qalora": False, "monteclora_config": None, "layer_replication": None,
    "lora_bias": False, "target_parameters": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None,
    "ensure_weight_tying": False,
}  # fmt: skip


def expected_adapter_keys(model_config: Any, adapter_config: Any) -> set[str] | None:
    """The keys ``get_peft_model_state_dict`` gives for ``adapter_config`` (the published adapter_config.json) on
    ``AutoModelForCausalLM`` of ``model_config``, or None when not known here: a model `expected_keys_from_config`
    does not vouch for, a field it does not know (or not at its default), targets other than the decoder layers'
    projections (embeddings, lm_head, norms, containers: PEFT wraps or refuses them in ways not derived here)."""
    if expected_keys_from_config(model_config) is None or not isinstance(adapter_config, dict):
        return None
    if any(k not in _NEUTRAL_FIELDS and (k not in _DEFAULT_FIELDS or v != _DEFAULT_FIELDS[k]) for k, v in adapter_config.items()):
        return None
    if str(adapter_config.get("peft_type", "")).upper() != "LORA":
        return None
    targets = adapter_config.get("target_modules")
    if isinstance(targets, str):
        if targets == "all-linear":
            return None
        try:
            pattern = re.compile(targets)
        except re.error:
            return None
        matches = lambda module: pattern.fullmatch(module) is not None  # noqa: E731 - PEFT's rule for a string
    elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        matches = lambda module: module in targets or any(module.endswith(f".{t}") for t in targets)  # noqa: E731
    else:
        return None
    layers = model_config.get("num_hidden_layers", 32)
    projections = {f"model.layers.{i}.{p}" for i in range(layers) for p in _PROJECTIONS}
    targeted = {module for module in _llama_modules(layers) if matches(module)}
    if not targeted or targeted - projections:
        return None
    return {f"{PEFT_WRAPPER_PREFIX}{module}.{lora}.weight" for module in targeted for lora in ("lora_A", "lora_B")}


def _llama_modules(layers: int) -> list[str]:
    """Every name of ``LlamaForCausalLM.named_modules()`` (the root included, as ""): what PEFT matches targets against."""
    names = ["", "model", "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head"]
    for i in range(layers):
        layer = f"model.layers.{i}"
        names += [layer, f"{layer}.self_attn", f"{layer}.mlp", f"{layer}.mlp.act_fn", f"{layer}.input_layernorm",
                  f"{layer}.post_attention_layernorm"]  # fmt: skip
        names += [f"{layer}.{p}" for p in _PROJECTIONS]
    return names
