"""The interface of weight transformation specs, their registry, and the per-module spec container.

A spec describes how the original Transformers weights of a few linears become the (sharded) weights of one custom
module and back. Specs are plain dataclasses: every number they need, tp size included, is a field; the tp rank
is an argument. Nothing here reads global parallel state.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import torch

from ..errors import SpecError
from .names import SUPPORTED_PEFT_TYPES
from .peft_targets import FusedProjections

# name -> spec class; specs are serialized by this name and deserialized only through this table.
SPEC_REGISTRY: dict[str, type["ModelWeightTransformationSpec"]] = {}
# Modules of the built-in specs: importing them registers them (the package no longer imports them eagerly).
_BUILTIN_SPEC_MODULES = (".fused_linears", ".gqa_qkv")


def register_spec(cls: type["ModelWeightTransformationSpec"]) -> type["ModelWeightTransformationSpec"]:
    """Class decorator adding a spec class to `SPEC_REGISTRY` under its class name; duplicates are refused."""
    name = cls.__name__
    if name in SPEC_REGISTRY and SPEC_REGISTRY[name] is not cls:
        raise SpecError(f"a weight transformation spec named {name!r} is already registered")
    SPEC_REGISTRY[name] = cls
    return cls


def load_builtin_specs() -> None:
    """Register the built-in specs (`FusedLinearsSpec`, `GQAQKVColumnParallelLinearSpec`)."""
    for module in _BUILTIN_SPEC_MODULES:
        importlib.import_module(module, __package__)


def spec_class_from_name(name: str, *, where: str = "metadata") -> type["ModelWeightTransformationSpec"]:
    load_builtin_specs()
    try:
        return SPEC_REGISTRY[name]
    except KeyError:
        raise SpecError(
            f"{where}: unknown weight transformation spec {name!r}; known specs: {sorted(SPEC_REGISTRY)}"
        ) from None


@dataclasses.dataclass
class ModelWeightTransformationSpec(ABC):
    """How the weights of some original linears map to the weights of one custom module, for every tp rank.

    Subclasses implement the eight abstract methods below (`permuted_input_modules` has a default); nothing outside
    a spec switches on its class. Names passed in and out have no adapter name (PEFT removes it when saving) and no
    ``base_layer`` component. A spec that only moves data also defines
    ``saved_layouts(module, shapes)``, its piece map (`pieces`, see `spec_fields`): ``to_original_weights`` is
    then `pieces_torch.spec_to_original`, and consolidation copies its bytes instead of rebuilding tensors.
    """

    # Set by `specialize_transformation_specs_for_model`: None for a plain model, "lora" once LoRA wraps the module.
    peft_type: str | None = dataclasses.field(default=None, kw_only=True)

    serialized_defaults: ClassVar[dict[str, Any]] = {}  # fields left out of the metadata when at these values

    @abstractmethod
    def get_relevant_parameter_names(self, module_fully_qualified_name: str) -> set[str]:
        """Every parameter name (original, custom and LoRA) this spec reads or writes."""

    @abstractmethod
    def guess_peft_type(self, model: torch.nn.Module, module_fully_qualified_name: str) -> str | None:
        """"lora" when the custom module of this spec is wrapped by a LoRA layer in ``model``, else None."""

    @abstractmethod
    def adapt_peft_config(self, peft_config: Any, inplace: bool = False) -> Any:
        """Rewrite a PEFT config written with original module names into the custom module names."""

    @abstractmethod
    def to_original_peft_config(self, peft_config: Any, inplace: bool = False) -> Any:
        """Inverse of `adapt_peft_config`."""

    @abstractmethod
    def adapt_state_dict(
        self, module_fully_qualified_name: str, state_dict: Mapping[str, Any], tp_rank: int
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Original weights (full tensors or lazy slices) -> this rank's custom weights.

        Returns the custom weights it produced and the original names it consumed. Only the names present in
        ``state_dict`` are handled, so base weights and LoRA weights can come in separate calls.
        """

    @abstractmethod
    def to_original_weights(
        self,
        module_fully_qualified_name: str,
        sharded_state_dicts: Mapping[str, Sequence[torch.Tensor]],
        parameters_metadata: Mapping[str, Mapping[str, Any]],
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """{custom name: [tensor per rank]} -> (original full weights, custom names consumed)."""

    @abstractmethod
    def with_tp_size(self, tp_size: int) -> "ModelWeightTransformationSpec":
        """The same spec for another tp size, ``peft_type`` kept (resharding)."""

    @abstractmethod
    def fused_projections(self) -> dict[str, FusedProjections]:
        """{fused module name (relative to the custom module): the original projections it holds}; {} when the
        spec fuses nothing. The PEFT config mapping and the consolidation's adapter names read it."""

    def fused_names(self) -> dict[str, tuple[str, ...]]:
        """{fused module: its original projections}, from `fused_projections` (the built-in specs answer it
        torch-free from their field classes, `transformations.spec_fields`)."""
        return {name: tuple(p.original_names) for name, p in self.fused_projections().items()}

    def permuted_input_modules(self) -> dict[str, str]:
        """{row-parallel module: the fused GQA module whose local query-head order its input columns follow}
        (row-parallel LoRA init takes the same columns); {} when the spec permutes no input columns."""
        return {}

    # -- serialization (docs/checkpoint_formats.md section 3: ["ClassName", {fields..., "peft_type": ...}]) --------------------

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "peft_type"}
        for key, default in self.serialized_defaults.items():
            if data.get(key) == default:
                del data[key]
        data["peft_type"] = self.peft_type
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "metadata") -> "ModelWeightTransformationSpec":
        data = dict(data)
        peft_type = data.pop("peft_type", None)
        if peft_type is not None and str(peft_type).lower() not in SUPPORTED_PEFT_TYPES:
            raise SpecError(f"{where}: {cls.__name__} has peft_type {peft_type!r}, supported: {SUPPORTED_PEFT_TYPES}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"{where}: {cls.__name__} got unknown fields {unknown}; expected fields {sorted(known)}")
        try:
            spec = cls(**data)
        except TypeError as e:
            raise SpecError(f"{where}: cannot build {cls.__name__} from {sorted(data)}: {e}") from None
        spec.peft_type = None if peft_type is None else str(peft_type).lower()
        return spec

    def _check_tp_rank(self, tp_rank: int) -> None:
        tp_size = getattr(self, "tp_size")
        if not 0 <= tp_rank < tp_size:
            raise SpecError(f"{type(self).__name__}: tp_rank={tp_rank} is out of range for tp_size={tp_size}")

    def _ranks(self, name: str, sharded_state_dicts: Mapping[str, Sequence[torch.Tensor]]) -> Sequence[torch.Tensor]:
        """The per-rank tensors of ``name``, checked to come from exactly tp_size ranks."""
        shards = sharded_state_dicts[name]
        tp_size = getattr(self, "tp_size")
        if len(shards) != tp_size:
            raise SpecError(f"{name}: expected one tensor per rank for tp_size={tp_size}, found {len(shards)}")
        return shards


@dataclasses.dataclass
class ModelWeightTransformationSpecs:
    """The specs of one custom module, with the module's fully qualified name once the model is built."""

    module_fully_qualified_name: str | None = None
    specs: list[ModelWeightTransformationSpec] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.specs, ModelWeightTransformationSpec):
            self.specs = [self.specs]
        for spec in self.specs:
            self._check_spec(spec)

    @staticmethod
    def _check_spec(spec: Any) -> None:
        if not isinstance(spec, ModelWeightTransformationSpec):
            raise TypeError(f"expected a ModelWeightTransformationSpec, got {type(spec).__name__}")

    def __iter__(self) -> Iterator[ModelWeightTransformationSpec]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def add_spec(self, spec: ModelWeightTransformationSpec) -> None:
        self._check_spec(spec)
        self.specs.append(spec)

    def _name(self) -> str:
        if self.module_fully_qualified_name is None:
            raise SpecError(
                "module_fully_qualified_name is not set; call specialize_transformation_specs_for_model(model) first"
            )
        return self.module_fully_qualified_name

    def get_relevant_parameter_names(self) -> set[str]:
        return set().union(*(spec.get_relevant_parameter_names(self._name()) for spec in self.specs))

    def is_transformation_spec_relevant(self, spec: ModelWeightTransformationSpec, parameter_names: set[str]) -> bool:
        return not spec.get_relevant_parameter_names(self._name()).isdisjoint(parameter_names)

    def adapt_state_dict(
        self, state_dict: Mapping[str, Any], tp_rank: int
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        local, consumed = {}, []
        for spec in self.specs:
            spec_local, spec_consumed = spec.adapt_state_dict(self._name(), state_dict, tp_rank)
            local.update(spec_local)
            consumed.extend(spec_consumed)
        return local, consumed

    def to_original_weights(
        self,
        sharded_state_dicts: Mapping[str, Sequence[torch.Tensor]],
        parameters_metadata: Mapping[str, Mapping[str, Any]],
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        original, consumed = {}, []
        for spec in self.specs:
            spec_original, spec_consumed = spec.to_original_weights(
                self._name(), sharded_state_dicts, parameters_metadata
            )
            original.update(spec_original)
            consumed.extend(spec_consumed)
        return original, consumed

    def to_metadata(self, parameters_for_current_stage: set[str] | None = None) -> dict[str, Any]:
        """JSON-ready entry of ``model_weight_transformation_specs`` (docs/checkpoint_formats.md section 3).

        With ``parameters_for_current_stage`` (pipeline parallelism), specs touching none of them are left out.
        """
        specs = [
            [type(spec).__name__, spec.to_dict()]
            for spec in self.specs
            if parameters_for_current_stage is None
            or self.is_transformation_spec_relevant(spec, parameters_for_current_stage)
        ]
        return {"module_fully_qualified_name": self._name(), "specs": specs}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], *, where: str = "metadata") -> "ModelWeightTransformationSpecs":
        try:
            module_name = metadata["module_fully_qualified_name"]
            entries = metadata["specs"]
        except (KeyError, TypeError):
            raise SpecError(
                f"{where}: a model_weight_transformation_specs entry needs 'module_fully_qualified_name' and 'specs'"
            ) from None
        specs = cls(module_fully_qualified_name=module_name)
        for entry in entries:
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], Mapping)):
                raise SpecError(f"{where}: spec entries of {module_name} must be [class name, fields], got {entry!r}")
            name, fields = entry
            spec_cls = spec_class_from_name(name, where=f"{where} ({module_name})")
            specs.add_spec(spec_cls.from_dict(fields, where=f"{where} ({module_name})"))
        return specs


class CustomModule:
    """Mixin marking an ``nn.Module`` whose weights differ from the original Transformers layout.

    The module declares its `ModelWeightTransformationSpecs` (usually in ``__init__``); loading, saving,
    consolidation and PEFT config adaptation all go through them.
    """

    @property
    def specs(self) -> ModelWeightTransformationSpecs:
        if "_specs" not in self.__dict__:
            self.__dict__["_specs"] = ModelWeightTransformationSpecs()
        return self.__dict__["_specs"]

    @specs.setter
    def specs(self, specs: ModelWeightTransformationSpecs) -> None:
        if not isinstance(specs, ModelWeightTransformationSpecs):
            raise TypeError(f"specs must be a ModelWeightTransformationSpecs, got {type(specs).__name__}")
        self.__dict__["_specs"] = specs
