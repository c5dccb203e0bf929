"""The typed schemas of the JSON files commands read from their inputs, in one place (validated by `utils.schema`):
our manifest, tensor-parallel metadata (``mp_metadata_pp_rank_<P>.json``), safetensors index files, PEFT
``adapter_config.json`` and the fields of Transformers' ``config.json`` that we use. Torch-free.

Each schema checks the types the readers rely on (a boolean is ``true``/``false``, never the string "false"; a size
is an integer, never 2.5) and lets unknown fields through, as files written by newer versions may carry more.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from ..errors import CheckpointError
from ..transformations.spec_fields import FusedLinearsFields, GQAQKVFields
from ..utils.safe_paths import check_safe_name
from ..utils.schema import AnyValue, Bool, Int, List, Map, Num, Obj, OneOf, Optional, Schema, Str, read_json

MAX_TP_SIZE = 1 << 16

# --- our manifest (`sharded.write_manifest`)
MANIFEST_SCHEMA = Obj(
    required={
        "format": Str(),
        "format_version": Int(),
        "tp_size": Int(min=1, max=MAX_TP_SIZE),
        "pp_size": Int(min=1, max=MAX_TP_SIZE),
        "files": Map(Obj(required={"size": Int(min=0), "sha256": Str(pattern=r"[0-9a-f]{64}", expected="a sha256 (64 hex digits)")})),
    },
    optional={"kind": Str(), "dtype": Optional(Str()), "adapters": List(Str())},
)


# --- tensor-parallel metadata: spec fields derived from the dataclasses that declare them (`spec_fields`)
def _field_schema(name: str, annotation: Any) -> Schema:
    if name == "fuse_axis":
        return OneOf(Int(min=0, max=1), Str(choices=("column", "row")))
    if name in ("tp_size", "num_attention_heads", "num_key_value_heads", "kv_size_multiplier"):
        return Int(min=1, max=MAX_TP_SIZE if name == "tp_size" else None)
    kinds = {"str": Str(), "int": Int(min=0), "bool": Bool(), "Sequence[str]": List(Str(), min_len=1),
             "Sequence[int]": List(Int(min=1), min_len=1)}  # fmt: skip
    return kinds[annotation if isinstance(annotation, str) else annotation.__name__]


def _spec_schema(field_class: type) -> Obj:
    required, optional = {}, {"peft_type": Optional(Str())}
    for f in dataclasses.fields(field_class):
        (required if f.default is dataclasses.MISSING else optional)[f.name] = _field_schema(f.name, f.type)
    return Obj(required, optional)


SPEC_SCHEMAS: dict[str, Obj] = {
    "GQAQKVColumnParallelLinearSpec": _spec_schema(GQAQKVFields),
    "FusedLinearsSpec": _spec_schema(FusedLinearsFields),
}


class _SpecEntry(Schema):
    """``[class name, {fields}]``; the fields of a known class checked against its schema (an unknown class is
    reported by the spec registry, with the names it knows)."""

    expected = "a [spec class name, fields object] pair"

    def check(self, value, field, fail):
        if type(value) is not list or len(value) != 2 or type(value[0]) is not str or type(value[1]) is not dict:
            fail(field, self.expected, value)
            return
        schema = SPEC_SCHEMAS.get(value[0])
        if schema is not None:
            schema.check(value[1], f"{field}[1]", fail)


PARAMETER_SCHEMA = Obj(
    required={"tensor_model_parallel": Bool()},
    optional={"partition_dim": Int(min=-1), "partition_stride": Int(min=1), "num_partitions": Int(min=1, max=MAX_TP_SIZE)},
)
METADATA_SCHEMA = Obj(
    optional={
        "parameters": Map(PARAMETER_SCHEMA),
        "model_weight_transformation_specs": List(Obj(required={"module_fully_qualified_name": Str(), "specs": List(_SpecEntry())})),
    },
)

# --- safetensors index files (`*.safetensors.index.json`)
INDEX_SCHEMA = Obj(required={"weight_map": Map(Str())}, optional={"metadata": Optional(Map(AnyValue()))})

# --- PEFT adapter_config.json: the fields we read
_PATTERNS = Optional(Map(Num()))
ADAPTER_CONFIG_SCHEMA = Obj(
    optional={
        "peft_type": Optional(Str()),
        "r": Int(min=1, max=1 << 20),
        "lora_alpha": Num(),
        "target_modules": Optional(OneOf(Str(), List(Str()))),
        "rank_pattern": Optional(Map(Int(min=1, max=1 << 20))),
        "alpha_pattern": _PATTERNS,
        "use_rslora": Bool(),
        "use_dora": Bool(),
        "fan_in_fan_out": Bool(),
        "lora_dropout": Num(min=0, max=1),
        "lora_bias": Bool(),
        "bias": Optional(Str()),
        "base_model_name_or_path": Optional(Str()),
        "modules_to_save": Optional(List(Str())),
        "task_type": Optional(Str()),
        "inference_mode": Bool(),
    },
)

# --- Transformers config.json: the fields resharding reads
MODEL_CONFIG_SCHEMA = Obj(
    optional={
        "hidden_size": Int(min=1),
        "intermediate_size": Int(min=1),
        "num_attention_heads": Int(min=1),
        "num_key_value_heads": Optional(Int(min=1)),
        "num_hidden_layers": Int(min=0),
        "vocab_size": Int(min=1),
        "head_dim": Optional(Int(min=1)),
        "tie_word_embeddings": Bool(),
        "model_type": Str(),
    },
)


def read_index_files(path: str | os.PathLike, *, error=CheckpointError) -> list[str]:
    """The shard file names a safetensors index lists, each a safe name in the index's directory."""
    index = read_json(path, INDEX_SCHEMA, error=error)
    files = sorted(set(index["weight_map"].values()))
    for name in files:
        check_safe_name(name, what="shard file name", where=path)
    return files
