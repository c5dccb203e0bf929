"""Resolve the ``--device`` a merge runs on, failing clearly when it is absent."""

from __future__ import annotations

import importlib
import importlib.util

import torch

from ..errors import MergeError


def available_devices() -> list[str]:
    """Device kinds usable in this process (``xla`` only when torch_xla is importable; it is not imported here)."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    if importlib.util.find_spec("torch_xla") is not None:
        found.append("xla")
    return found


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``cpu``, ``cuda[:N]`` or ``xla`` (the Neuron device on Trainium) as a ``torch.device``."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, torch.device):
        device = str(device)
    kind = device.split(":", 1)[0]
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise MergeError(
                f"--device {device}: CUDA is not available in this torch build or machine; "
                f"available devices: {', '.join(available_devices())}"
            )
        return torch.device(device)
    if kind == "xla":
        if importlib.util.find_spec("torch_xla") is None:
            raise MergeError(
                f"--device {device}: torch_xla is not installed (needed for the Neuron device); "
                f"available devices: {', '.join(available_devices())}"
            )
        xm = importlib.import_module("torch_xla.core.xla_model")
        return xm.xla_device()
    raise MergeError(f"--device {device}: expected cpu, cuda[:N] or xla; available: {', '.join(available_devices())}")
