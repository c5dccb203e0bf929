"""A consolidated adapter's ``adapter_config.json``: ``target_modules`` in original names, checked against the LoRA
tensors the adapter holds. Both engines call this (one place for the rule); torch-free.

Training fuses projections (``qkv_proj``, ``gate_up_proj``): the checkpoint's config may target the fused module,
the published one must target the original projections (vanilla PEFT on the Transformers model). optimum-neuron
saves one shared ``lora_A`` (and a fused ``lora_B``) for a fused module, read back as every projection's: outputs of
projections the config does not target are dropped when they come from such a shared tensor; any other LoRA tensor
of an untargeted module, or a target without LoRA tensors, is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import CheckpointError
from ..utils.schema import read_json
from .loadability import targeted
from .schemas import ADAPTER_CONFIG_SCHEMA

FusedNames = Sequence[tuple[str, tuple[str, ...]]]  # (fused module name, its original projections)


def fused_names_of(specs: Iterable[Any]) -> list[tuple[str, tuple[str, ...]]]:
    """(fused module name, its original projections) of each spec (spec object or declared layout) that fuses:
    every spec field class answers `fused_names` (`transformations.spec_fields`)."""
    return [item for spec in specs for item in spec.fused_names().items()]


def restore_fused_targets(targets: list[str], fused_names: FusedNames) -> list[str]:
    """``target_modules`` entries naming a fused module (bare, ``qkv_proj``, or full path, as vanilla PEFT saves
    ``all-linear`` expanded: ``model.layers.0.self_attn.qkv_proj``) replaced by its original projections, with the
    same prefix. Projections already listed next to it (partial targets) are kept alone (`remove_fused_target`)."""
    for fused, projections in fused_names:
        restored: list[str] = []
        for entry in targets:
            if entry == fused or entry.endswith(f".{fused}"):
                prefix = entry[: len(entry) - len(fused)]
                expanded = [prefix + p for p in projections]
                entry_list = [] if any(e in targets for e in expanded) else expanded
            else:
                entry_list = [entry]
            restored += [e for e in entry_list if e not in restored]
        targets = restored
    return targets


def shared_lora_projections(module: str, fused_names: FusedNames, saved_names: Iterable[str]) -> set[str]:
    """Original projections of ``module`` served by an optimum-neuron shared lora_A / fused lora_B in ``saved_names``."""
    saved = set(saved_names)
    out: set[str] = set()
    for fused, projections in fused_names:
        names = {f"{module}.{fused}.lora_A.weight", f"{module}.{fused}.lora_B.weight", f"{module}.{fused}.lora_B.weight_qkv"}
        if names & saved:
            out |= {f"{module}.{p}" for p in projections}
    return out


def lora_module_of(name: str) -> str | None:
    """``model.layers.0.self_attn.q_proj.lora_A.weight`` -> ``model.layers.0.self_attn.q_proj``."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.startswith("lora_"):
            return ".".join(parts[:i])
    return None


@dataclass(frozen=True)
class AdapterGroup:
    """One group of an adapter's outputs: the rank file it is read from (named in errors), the projections a
    shared tensor of it serves (`shared_lora_projections`), and its output names (original, no PEFT prefix)."""

    rank_file: Path
    droppable: set[str]
    outputs: list[str]


def restore_adapter_config(path: Path, fused_names: FusedNames, groups: Sequence[AdapterGroup]) -> tuple[dict[str, Any], list[list[str]]]:
    """(the config of ``path`` with ``target_modules`` in original names, the outputs each group keeps): module
    docstring. One-line `CheckpointError` for a mismatch."""
    config = read_json(path, ADAPTER_CONFIG_SCHEMA, error=CheckpointError)
    targets = config.get("target_modules")
    if isinstance(targets, list):
        targets = sorted(restore_fused_targets(targets, fused_names))
        config["target_modules"] = targets
    produced: set[str] = set()
    kept_per_group = []
    for group in groups:
        kept = []
        for name in group.outputs:
            module = lora_module_of(name)
            if module is None:
                raise CheckpointError(f"{group.rank_file}: adapter file holds '{name}', which is not a LoRA tensor")
            if not targeted(targets, module):
                if module in group.droppable:
                    continue
                raise CheckpointError(
                    f"{path}: target_modules {targets} does not target {module}, which has LoRA tensors in "
                    f"{group.rank_file.name}"
                )
            produced.add(module)
            kept.append(name)
        kept_per_group.append(kept)
    if isinstance(targets, list):
        missing = sorted(t for t in set(targets) if not any(targeted([t], m) for m in produced))
        if missing:
            raise CheckpointError(f"{path}: target_modules lists {missing} but the checkpoint has no LoRA tensors for them")
    return config, kept_per_group
