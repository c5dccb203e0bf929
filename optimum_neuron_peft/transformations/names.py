"""Parameter-name helpers for PEFT-wrapped models, done on name components rather than regexes over paths.

A LoRA parameter name looks like ``<module>.lora_A.<adapter>.<param>`` in a model and ``<module>.lora_A.<param>``
in a saved adapter (PEFT drops the adapter name when saving). The wrapped base layer appears as
``<module>.base_layer.<param>``.
"""

from __future__ import annotations

from typing import Any, Mapping

LORA_MODULE_NAMES = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"})
# PEFT keeps these as ParameterDicts: ``<module>.lora_embedding_A.<adapter>`` in a model, ``<module>.lora_embedding_A``
# in a saved adapter, so a single component after them is the adapter name.
LORA_PARAMETER_DICT_NAMES = frozenset({"lora_embedding_A", "lora_embedding_B"})
BASE_LAYER = "base_layer"
# Names inside a ``PeftModel`` start with this (``base_model`` is the LoraModel, ``model`` the wrapped Transformers
# model); a saved PEFT adapter keeps it on every key, exactly once.
PEFT_WRAPPER_PREFIX = "base_model.model."
# The files of a PEFT adapter directory (PEFT's ``peft.utils.constants`` CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME and
# WEIGHTS_NAME; a test pins them): written by save_pretrained and consolidation, read by loading and merging.
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_PICKLE_WEIGHTS_NAME = "adapter_model.bin"
# The PEFT types the specs and the parallel LoRA layers handle (``peft.PeftType`` values, lower case).
SUPPORTED_PEFT_TYPES = ("lora",)


def peft_type_name(peft_config: Any) -> str:
    """A PEFT config's type as written in messages (``"LORA"``), from a ``PeftType`` or a string."""
    value = getattr(peft_config, "peft_type", None)
    return str(getattr(value, "value", value)).upper()


def is_supported_peft_type(peft_config: Any) -> bool:
    return peft_type_name(peft_config).lower() in SUPPORTED_PEFT_TYPES


def without_peft_prefix(name: str) -> str:
    """``base_model.model.model.layers.0.mlp`` (inside a PeftModel) -> ``model.layers.0.mlp``."""
    return name.removeprefix(PEFT_WRAPPER_PREFIX)


def _lora_component(parts: list[str]) -> int | None:
    for i, part in enumerate(parts):
        if part in LORA_MODULE_NAMES:
            return i
    return None


def _has_adapter_name(parts: list[str], i: int | None) -> bool:
    if i is None:
        return False
    following = len(parts) - i - 1
    # ``lora_A.<adapter>.weight``: the adapter name and a parameter name follow the LoRA module;
    # ``lora_embedding_A.<adapter>``: only the adapter name follows (a ParameterDict entry).
    return following == 1 if parts[i] in LORA_PARAMETER_DICT_NAMES else following >= 2


def get_adapter_name(parameter_fully_qualified_name: str) -> str | None:
    """The adapter name in ``...lora_A.<adapter>.weight`` / ``...lora_embedding_A.<adapter>``; None without one."""
    parts = parameter_fully_qualified_name.split(".")
    i = _lora_component(parts)
    if not _has_adapter_name(parts, i):
        return None
    return parts[i + 1]


def remove_adapter_name(name: str) -> str:
    """``a.lora_A.default.weight`` -> ``a.lora_A.weight``; names without an adapter name are returned unchanged."""
    parts = name.split(".")
    i = _lora_component(parts)
    if not _has_adapter_name(parts, i):
        return name
    return ".".join(parts[: i + 1] + parts[i + 2 :])


def add_adapter_name(name: str, adapter_name: str) -> str:
    """``a.lora_A.weight`` -> ``a.lora_A.<adapter>.weight`` (inverse of `remove_adapter_name`)."""
    parts = name.split(".")
    i = _lora_component(parts)
    if i is None:
        return name
    return ".".join(parts[: i + 1] + [adapter_name] + parts[i + 1 :])


def is_base_layer(name: str) -> bool:
    return BASE_LAYER in name.split(".")


def remove_base_layer(name: str) -> str:
    """``a.base_layer.weight`` -> ``a.weight``."""
    return ".".join(part for part in name.split(".") if part != BASE_LAYER)


def is_lora_parameter(name: str) -> bool:
    return _lora_component(name.split(".")) is not None


def split_lora_name(name: str) -> tuple[str, str, str] | None:
    """``m.lora_B.weight_q`` (adapter name removed) -> (``m``, ``lora_B``, ``weight_q``); None for other names."""
    parts = name.split(".")
    i = _lora_component(parts)
    if i is None or i + 2 != len(parts):
        return None
    return ".".join(parts[:i]), parts[i], parts[i + 1]


def normalize_parameters_metadata(
    parameters_metadata: Mapping[str, Mapping[str, Any]], adapter_name: str | None = None
) -> dict[str, dict[str, Any]]:
    """Metadata keyed like saved tensors: adapter names and ``base_layer`` removed, other adapters dropped."""
    out = {}
    for name, entry in parameters_metadata.items():
        adapter = get_adapter_name(name)
        if adapter_name is not None and adapter is not None and adapter != adapter_name:
            continue
        out[remove_base_layer(remove_adapter_name(name))] = dict(entry)
    return out
