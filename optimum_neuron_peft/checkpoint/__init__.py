"""Checkpoints: our sharded format, optimum-neuron's (read safely, without torch_xla), consolidation into
Transformers / PEFT directories, resharding and verification. See docs/checkpoint_formats.md.

The public names are resolved on first use (PEP 562), so the torch-free consolidation path
(`checkpoint.consolidate`, `checkpoint.torch_free`) imports its modules without importing torch through this package.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

# public name -> submodule defining it
_EXPORTS = {
    "ConsolidationResult": ".engine_common",
    "consolidate": ".consolidate",  # the dispatch: imports torch only when the torch engine runs
    "reshard": ".reshard",
    "save_sharded_checkpoint": ".save",
    "save_sharded_checkpoint_distributed": ".save",
    "verify": ".verify",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Importing a submodule binds it to the package attribute of the same name: without this, importing
    ``checkpoint.consolidate`` (the module) would hide ``checkpoint.consolidate`` (the function), which the eager
    imports this file used to have always won. The submodules stay reachable through ``sys.modules``."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
