"""Byte provenance (rebuilt weights as byte ranges of the rank files) and the byte-copy consolidation path."""

from __future__ import annotations

import errno
import os
import sys

import pytest
import torch

from optimum_neuron_peft.checkpoint.consolidate import consolidate
from optimum_neuron_peft.checkpoint.torch_engine import plan_consolidation
from optimum_neuron_peft.transformations.pieces import ColumnGather, RowCopy

from consolidation_helpers import (
    adapter_state,
    assert_adapter_loads_equal,
    assert_model_loads_equal,
    model_state,
    write_optimum_neuron,
    write_ours,
)
from provenance_oracle import SourceInfo, derive


def _sources(shapes: dict[str, list[tuple[int, ...]]]) -> list[tuple[str, list[SourceInfo]]]:
    return [(n, [SourceInfo(s, torch.bfloat16) for s in ranks]) for n, ranks in shapes.items()]


def test_derive_finds_row_and_column_moves_and_rejects_arithmetic():
    sources = _sources({"a": [(3, 4), (3, 4)], "b": [(5, 2), (5, 2)]})

    def rebuild(t):
        a, b = t["a"], t["b"]
        return {
            "rows": torch.cat([a[1], a[0][1:]]),  # rank 1 then rows 1..2 of rank 0
            "cols": torch.cat([b[1], b[0]], dim=1),  # columns of rank 1 then rank 0
            "shifted": a[0] + 1,
            "scaled": a[1] * 2,
        }

    outputs = {"rows": ((5, 4), torch.bfloat16), "cols": ((5, 4), torch.bfloat16),
               "shifted": ((3, 4), torch.bfloat16), "scaled": ((3, 4), torch.bfloat16)}  # fmt: skip
    found = derive(rebuild, sources, outputs)
    assert found == {
        "rows": RowCopy(((0, 1, 0, 3), (0, 0, 1, 3))),
        "cols": ColumnGather(((1, 1, 0, 2), (1, 0, 0, 2))),
    }
    # A dtype change is not a byte move.
    assert derive(rebuild, sources, {"rows": ((5, 4), torch.float32)}) == {}


def test_derive_raises_a_spec_bug_instead_of_calling_it_not_a_data_move():
    sources = _sources({"a": [(3, 4), (3, 4)], "b": [(5, 2), (5, 2)]})
    outputs = {"rows": ((6, 4), torch.bfloat16)}

    def shape_refused(t):  # torch refuses the shapes: not a data move in this layout
        return {"rows": torch.cat([t["a"][0], t["b"][0]])}

    assert derive(shape_refused, sources, outputs) == {}

    def buggy(t):  # a TypeError is a bug of the rebuild, whatever the index tensors
        return {"rows": torch.cat(t["a"], dims=0)}

    with pytest.raises(TypeError):
        derive(buggy, sources, outputs)

    def missing_name(t):  # every saved tensor is given at once first: a missing one there is a bug too
        return {"rows": torch.cat([t["a"][0], t["c"][0]])}

    with pytest.raises(KeyError, match="'c'"):
        derive(missing_name, sources, outputs)


@pytest.mark.parametrize("tp", [2, 4])
def test_every_llama_output_is_a_byte_move(tmp_path, tp):
    model = model_state(torch.bfloat16)
    write_ours(tmp_path / "ckpt", tp, model=model, adapters={"a": adapter_state()})
    _, targets = plan_consolidation(tmp_path / "ckpt")
    kinds = {}
    for target in targets:
        for group in target.groups:
            for name, plan in group.outputs:
                kinds[plan.name] = type(group.provenance.get(name)).__name__
    assert set(kinds.values()) == {"RowCopy", "ColumnGather"}  # nothing left to the tensor path
    columns = sorted(n for n, k in kinds.items() if k == "ColumnGather")
    assert columns == sorted(
        f"{prefix}model.layers.{i}.{m}"
        for i in range(2)
        for prefix, m in [("", "self_attn.o_proj.weight"), ("", "mlp.down_proj.weight"),
                          ("base_model.model.", "self_attn.o_proj.lora_A.weight"),
                          ("base_model.model.", "mlp.down_proj.lora_A.weight")]
    )  # fmt: skip


def _without_provenance(monkeypatch):
    module = sys.modules["optimum_neuron_peft.checkpoint.torch_engine"]
    monkeypatch.setattr(module, "_derive_provenance", lambda *args: {})


def _no_copy_file_range(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)


@pytest.mark.parametrize("path", ["tensor path", "no copy_file_range", "fp32 cast", "pytorch format"])
def test_every_path_writes_the_same_model(tmp_path, monkeypatch, path):
    model = model_state(torch.bfloat16)
    adapter = adapter_state(shared_lora_a=True)
    write_optimum_neuron(tmp_path / "ckpt", 4, model=model, adapter=adapter)
    kwargs = {}
    if path == "tensor path":
        _without_provenance(monkeypatch)
    elif path == "no copy_file_range":
        _no_copy_file_range(monkeypatch)
    elif path == "fp32 cast":
        kwargs["dtype"] = "fp32"
        model = {n: t.float() for n, t in model.items()}
        adapter = ({n: t.float() for n, t in adapter[0].items()}, adapter[1])
    else:
        kwargs["format"] = "pytorch"
    consolidate(tmp_path / "ckpt", tmp_path / "out", verify=True, **kwargs)
    if path == "pytorch format":
        loaded = torch.load(tmp_path / "out" / "pytorch_model.bin", weights_only=True)
        assert sorted(loaded) == sorted(model)
        for name, tensor in model.items():
            assert torch.equal(loaded[name].view(torch.int16), tensor.view(torch.int16)), name
        return
    assert_model_loads_equal(tmp_path / "out", model)
    assert_adapter_loads_equal(tmp_path / "out" / "default", adapter[0])
