"""What a PEFT config must be for our parallel LoRA layers: checked by the layers and by config adaptation alike."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..transformations.names import SUPPORTED_PEFT_TYPES, is_supported_peft_type, peft_type_name


def check_lora_config(config: Any) -> None:
    """Refuse, with a `ConfigError` naming what is supported, the PEFT configs our parallel LoRA layers cannot run."""
    if not is_supported_peft_type(config):
        raise ConfigError(
            f"PEFT type {peft_type_name(config)!r} is not supported for tensor-parallel models; supported PEFT types: "
            f"{', '.join(t.upper() for t in SUPPORTED_PEFT_TYPES)} (peft.LoraConfig)"
        )
    if getattr(config, "use_dora", False):
        raise ConfigError("use_dora=True (DoRA) is not supported on tensor-parallel layers; set use_dora=False")
    if getattr(config, "lora_bias", False):
        raise ConfigError("lora_bias=True is not supported on tensor-parallel layers; set lora_bias=False")
    init = config.init_lora_weights
    if not (init is True or init is False or (isinstance(init, str) and init.lower() == "gaussian")):
        raise ConfigError(
            f"init_lora_weights={init!r} is not supported on tensor-parallel layers; supported: True, False, 'gaussian'"
        )
    unsupported = {
        "target_parameters": getattr(config, "target_parameters", None),
        "layer_replication": getattr(config, "layer_replication", None),
        "trainable_token_indices": getattr(config, "trainable_token_indices", None),
        "fan_in_fan_out": getattr(config, "fan_in_fan_out", False),
    }
    for name, value in unsupported.items():
        if value:
            raise ConfigError(f"{name}={value!r} is not supported for tensor-parallel models; leave it unset")
    if getattr(config, "bias", "none") != "none":
        raise ConfigError(f"bias={config.bias!r} is not supported for tensor-parallel models; use bias='none'")
