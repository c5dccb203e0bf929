"""Worker for test_collective_count.py: counts the torch.distributed collectives of one forward (and backward).

The calls are counted by wrapping the torch.distributed functions that `optimum_neuron_peft.parallel.collectives`
calls (instrumentation: the real collectives still run).
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import peft
import torch

from optimum_neuron_peft.parallel import collectives

COUNTED = ("all_gather", "all_reduce", "reduce_scatter")
R, TOKENS = 4, 6  # one sequence of 6 tokens: activation sizes (6 x ...) differ from the LoRA factors' (32 x ...)


class Counter:
    def __init__(self) -> None:
        self.calls: collections.Counter = collections.Counter()
        self.numels: list[tuple[str, int]] = []

    def __enter__(self) -> "Counter":
        self.saved = {name: getattr(collectives.dist, name) for name in COUNTED}
        for name, fn in self.saved.items():
            def wrapped(*args, _name=name, _fn=fn, **kwargs):
                self.calls[_name] += 1
                tensor = args[0] if _name == "all_reduce" else args[1] if _name == "all_gather" else args[0]
                self.numels.append((_name, tensor.numel()))
                return _fn(*args, **kwargs)
            setattr(collectives.dist, name, wrapped)
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self.saved.items():
            setattr(collectives.dist, name, fn)


def count(root: Path, sp: bool, lora: bool) -> dict[str, Any]:
    from optimum_neuron_peft.models import AutoModelForCausalLM
    from optimum_neuron_peft.peft import get_peft_model

    model = AutoModelForCausalLM.from_pretrained(root, sequence_parallel=sp)
    net: torch.nn.Module = model
    if lora:
        torch.manual_seed(0)
        net = get_peft_model(model, peft.LoraConfig(r=R, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(0, 64, (TOKENS,), generator=torch.Generator().manual_seed(0))[None]
    with Counter() as fwd:
        loss = net(input_ids=ids, labels=ids, return_logits=False).loss
    out = {"forward": dict(fwd.calls)}
    if lora:
        with Counter() as bwd:
            loss.backward()
        out["backward"] = dict(bwd.calls)
        out["backward_numels"] = bwd.numels
    return out


def worker(rank: int, world: int, root: str) -> dict[str, Any]:
    from optimum_neuron_peft.parallel import destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(world)
    try:
        return {(sp, lora): count(Path(root), sp, lora) for sp in (False, True) for lora in (False, True)}
    finally:
        destroy_model_parallel()
