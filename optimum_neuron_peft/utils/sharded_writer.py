"""The sharded checkpoint writer, as the models and the PEFT integration reach it.

``save_pretrained`` of `models` and `peft` writes the project's sharded format, whose writer (`checkpoint.save`)
sits above them in the layering (docs/concepts.md, "Layering"). The package root registers a loader for it here
(optimum_neuron_peft/__init__.py, run before any submodule); the models call `sharded_writer()` when saving.
"""

from __future__ import annotations

from types import ModuleType
from typing import Callable

_loader: Callable[[], ModuleType] | None = None


def register_sharded_writer(loader: Callable[[], ModuleType]) -> None:
    """``loader()`` returns the writer module (``save_sharded_checkpoint``, ``save_sharded_checkpoint_distributed``,
    ``AdapterShards``); called on each save, so the writer is imported only by the first one."""
    global _loader
    _loader = loader


def sharded_writer() -> ModuleType:
    if _loader is None:
        raise RuntimeError("no sharded checkpoint writer registered; import optimum_neuron_peft (its root registers it)")
    return _loader()
