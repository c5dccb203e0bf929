"""Merging after consolidation: combine LoRA adapters (PEFT's combination types) and merge one into base weights."""

from .base_merge import merge_adapter_into_base
from .combine import COMBINATION_TYPES, combine_adapters, module_order_from_config
from .device import available_devices, resolve_device

__all__ = [
    "COMBINATION_TYPES",
    "available_devices",
    "combine_adapters",
    "merge_adapter_into_base",
    "module_order_from_config",
    "resolve_device",
]
