"""Read and write vanilla PEFT LoRA adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint.schemas import ADAPTER_CONFIG_SCHEMA
from ..errors import MergeError
from ..transformations.names import ADAPTER_CONFIG_NAME, ADAPTER_PICKLE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME, PEFT_WRAPPER_PREFIX
from ..utils.schema import read_json

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_UNSUPPORTED_FLAGS = ("use_dora", "lora_bias")


@dataclass
class LoraModule:
    """The two factors of one adapted module: ``A`` (r, in) and ``B`` (out, r)."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass
class Adapter:
    path: Path
    config: dict
    modules: dict[str, LoraModule] = field(default_factory=dict)  # PEFT module name -> factors

    @property
    def max_rank(self) -> int:
        """PEFT's rank for allocation: max of ``r`` and every ``rank_pattern`` value."""
        return max([int(self.config["r"]), *(int(v) for v in (self.config.get("rank_pattern") or {}).values())])


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's ``get_pattern_key``: a pattern matches a module whose name ends with it at a dot boundary."""
    name = module.removeprefix(PEFT_WRAPPER_PREFIX)
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def module_scaling(config: dict, module: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    weights = path / ADAPTER_WEIGHTS_NAME
    if weights.is_file():
        try:
            return load_file(weights)
        except Exception as e:  # safetensors raises its own error types
            raise MergeError(f"{weights}: not a readable safetensors file ({e})") from e
    legacy = path / ADAPTER_PICKLE_WEIGHTS_NAME
    if legacy.is_file():
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]  # torch explains over several lines
            raise MergeError(f"{legacy}: cannot be read safely with weights_only=True ({first_line})") from None
    raise MergeError(f"{path}: expected {ADAPTER_WEIGHTS_NAME} (or {ADAPTER_PICKLE_WEIGHTS_NAME}), found neither")


def load_adapter(path: str | Path) -> Adapter:
    """Load and validate a LoRA adapter directory; every user error names the file and what was expected."""
    path = Path(path)
    config_path = path / ADAPTER_CONFIG_NAME
    if not config_path.is_file():
        raise MergeError(f"{config_path}: adapter config not found (expected a PEFT adapter directory)")
    config = read_json(config_path, ADAPTER_CONFIG_SCHEMA, error=MergeError)
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise MergeError(f"{config_path}: expected peft_type LORA, found {config.get('peft_type')!r}")
    for flag in _UNSUPPORTED_FLAGS:
        if config.get(flag):
            raise MergeError(f"{config_path}: {flag}=true is not supported by merging (vanilla LoRA only)")
    if "r" not in config or "lora_alpha" not in config:
        raise MergeError(f"{config_path}: expected the keys 'r' and 'lora_alpha'")
    tensors = _read_weights(path)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise MergeError(
                f"{path / ADAPTER_WEIGHTS_NAME}: unsupported key {key!r}; expected '<module>.lora_A.weight' / "
                "'<module>.lora_B.weight' of a LoRA on linear layers (embeddings, DoRA, biases and "
                "modules_to_save are not supported)"
            )
        factors.setdefault(match["module"], {})[match["which"]] = tensor
    adapter = Adapter(path=path, config=config)
    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise MergeError(f"{path / ADAPTER_WEIGHTS_NAME}: module {module!r} has no {missing}.weight")
        A, B = pair["A"], pair["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise MergeError(
                f"{path / ADAPTER_WEIGHTS_NAME}: module {module!r}: expected lora_A (r, in) and lora_B (out, r), "
                f"found {tuple(A.shape)} and {tuple(B.shape)}"
            )
        expected_r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        if A.shape[0] != expected_r:
            raise MergeError(
                f"{path / ADAPTER_WEIGHTS_NAME}: module {module!r}: config says r={expected_r}, lora_A has rank {A.shape[0]}"
            )
        adapter.modules[module] = LoraModule(A=A, B=B, scaling=module_scaling(config, module, A.shape[0]))
    if not adapter.modules:
        raise MergeError(f"{path / ADAPTER_WEIGHTS_NAME}: no LoRA weights found")
    return adapter


def save_adapter(output_dir: Path, config: dict, modules: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT key names, no adapter name)."""
    tensors = {}
    for module, (A, B) in modules.items():
        tensors[f"{module}.lora_A.weight"] = A.detach().to("cpu").contiguous()
        tensors[f"{module}.lora_B.weight"] = B.detach().to("cpu").contiguous()
    save_file(tensors, output_dir / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})
    (output_dir / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def natural_key(name: str) -> list:
    """Sort key placing ``layers.2`` before ``layers.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
