"""The checkpoint's ``config.json`` must agree with the weights consolidation produces from it.

Metadata can describe weights of other sizes than the config (``original_dims`` of a fused MLP, head counts of a
GQA spec): the rank files then agree with the metadata, and without this check a model directory whose
``config.json`` cannot load its own weights would be published. The expected shapes are those of the Llama family
(Llama, Mistral, Qwen3, Granite: the architectures we shard; from the parallel plan), for the tensor names they use;
other names are not checked. Torch-free.
"""

from __future__ import annotations

import os
import re
from typing import Iterable

from ..errors import CheckpointError
from ..transformations.names import PEFT_WRAPPER_PREFIX
from ..transformations.parallel_plan import linear_shapes
from ..utils.schema import read_json
from .schemas import MODEL_CONFIG_SCHEMA

_LAYER = re.compile(r"(?:.*\.)?layers\.\d+\.(self_attn|mlp)\.(\w+_proj)")


def check_config_shapes(config_file: str | os.PathLike | None, tensors: Iterable[tuple[str, tuple[int, ...]]]) -> None:
    """Raise `CheckpointError` naming ``config_file`` when a produced tensor (model weight or LoRA factor, original
    names) has a shape the config does not give it."""
    if config_file is None:
        return
    config = read_json(config_file, MODEL_CONFIG_SCHEMA, error=CheckpointError)
    linears = linear_shapes(config)
    if linears is None:
        return
    for name, shape in tensors:
        bare = name.removeprefix(PEFT_WRAPPER_PREFIX)
        match = _LAYER.match(bare)
        if match is None or match.group(2) not in linears:
            continue
        out_features, in_features = linears[match.group(2)]
        rest = bare[match.end():]
        if rest == ".weight":
            expected = {0: out_features, 1: in_features}
        elif rest == ".bias":
            expected = {0: out_features}
        elif rest == ".lora_A.weight":
            expected = {1: in_features}
        elif rest == ".lora_B.weight":
            expected = {0: out_features}
        else:
            continue
        for dim, size in expected.items():
            if len(shape) <= dim or shape[dim] != size:
                raise CheckpointError(
                    f"{config_file}: tensor '{name}' is produced with shape {tuple(shape)}, but config.json gives "
                    f"dimension {dim} the size {size} (metadata such as original_dims disagrees with the config)"
                )
