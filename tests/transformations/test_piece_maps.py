"""One piece map per spec (`spec_fields.saved_layouts`), executed three ways, against the original weights.

For each configuration: original weights -> every rank's shards (the spec's ``adapt_state_dict``), then back
(1) with torch (`pieces_torch`, what the spec's ``to_original_weights`` runs) and (2) as byte ranges of real
safetensors rank files, read by the consolidation byte copier (`checkpoint.byte_copy`) from the piece map that
`checkpoint.declared` plans from the serialized fields. Both must give the original bytes exactly, and (3) the
test oracle that traces index tensors through the rebuild (tests/checkpoint/provenance_oracle.py) must find
the same piece map.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig
from safetensors.torch import save_file

from optimum_neuron_peft.checkpoint.byte_copy import SourceFiles, Scratch, gather_column_bytes, read_ranges_into_bytes, row_ranges
from optimum_neuron_peft.checkpoint.declared import DECLARED_SPECS, GroupShapes, DeclaredLayout, declared_spec, group_outputs
from optimum_neuron_peft.formats.stored_tensor import read_safetensors_header
from optimum_neuron_peft.errors import SpecError
from optimum_neuron_peft.transformations import FusedLinearsSpec, GQAQKVColumnParallelLinearSpec, ModelWeightTransformationSpec
from optimum_neuron_peft.transformations.pieces import (
    Block,
    ColumnGather,
    RowCopy,
    SavedLayout,
    original_layouts,
    replicated,
    sharded,
)
from optimum_neuron_peft.transformations.peft_targets import FusedModuleSpec, FusedProjections
from optimum_neuron_peft.transformations.pieces_torch import gather_saved, spec_to_original

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "checkpoint"))  # the oracle lives with the checkpoint tests
from provenance_oracle import SourceInfo, derive  # noqa: E402

MODULE = "model.layers.0.block"


def _random(shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _shards(spec, original: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    per_rank = [spec.adapt_state_dict(MODULE, original, rank) for rank in range(spec.tp_size)]
    for _, consumed in per_rank:
        assert sorted(consumed) == sorted(original)
    return {name: [local[name].contiguous() for local, _ in per_rank] for name in per_rank[0][0]}


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b""


def _from_files(spec, shards: dict[str, list[torch.Tensor]], tmp_path: Path) -> dict[str, tuple[tuple[int, ...], bytes]]:
    """Every original weight as (shape, bytes) read from rank files by the byte copier, from the declared piece map."""
    tp = spec.tp_size
    paths = []
    for rank in range(tp):
        path = tmp_path / f"rank{rank}.safetensors"
        save_file({name: ranks[rank] for name, ranks in shards.items()}, path)
        paths.append(path)
    headers = [read_safetensors_header(path) for path in paths]
    names = list(shards)
    group = GroupShapes(names, {n: tuple(headers[0][n].shape) for n in names}, tp)
    outputs = group_outputs(MODULE, [declared_spec(type(spec).__name__, spec.to_dict())], group, {})
    sources = [[headers[r][n] for r in range(tp)] for n in names]
    found = {}
    with SourceFiles() as files:
        for output in outputs:
            item = sources[output.source][0].itemsize
            out = np.empty(int(np.prod(output.shape)) * item, dtype=np.uint8)
            if isinstance(output.provenance, RowCopy):
                ranges = row_ranges(output.provenance, sources)
                read_ranges_into_bytes(files, ranges, memoryview(out))
            else:
                rows = out.reshape(output.shape[0], -1)
                assert gather_column_bytes(files, output.provenance, sources, rows, Scratch())
            found[output.name] = (output.shape, out.tobytes())
    return found, outputs


def _canonical(provenance, shards, names):
    """A column gather of every column of one shard is that shard's rows (the form the piece maps say)."""
    if isinstance(provenance, ColumnGather) and len(provenance.pieces) == 1:
        k, r, first, stop = provenance.pieces[0]
        shape = shards[names[k]][r].shape
        if (first, stop) == (0, shape[1]):
            return RowCopy(((k, r, 0, shape[0]),))
    return provenance


def _check(spec, original: dict[str, torch.Tensor], shards: dict[str, list[torch.Tensor]], tmp_path: Path, expected=None):
    expected = original if expected is None else expected
    # (1) torch executor
    rebuilt, consumed = spec.to_original_weights(MODULE, shards, {})
    assert sorted(consumed) == sorted(shards)
    assert sorted(rebuilt) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(rebuilt[name], tensor, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    # (2) byte copier over real rank files
    from_files, outputs = _from_files(spec, shards, tmp_path)
    assert [o.name for o in outputs] == list(rebuilt)  # the same order as to_original_weights
    for name, tensor in expected.items():
        shape, data = from_files[name]
        assert shape == tuple(tensor.shape) and data == _bytes(tensor), name
    # (3) the oracle finds the same piece map by tracing index tensors through the rebuild
    names = list(shards)
    sources = [(n, [SourceInfo(tuple(t.shape), t.dtype) for t in ranks]) for n, ranks in shards.items()]
    traced = derive(
        lambda index: spec.to_original_weights(MODULE, index, {})[0], sources,
        {n: (tuple(t.shape), t.dtype) for n, t in rebuilt.items()},
    )
    assert {n: _canonical(p, shards, names) for n, p in traced.items()} == {o.name: o.provenance for o in outputs}


def _gqa_cases():
    # (H, K) with GQA groups of 1, 2, 4 and 8 query heads: kv multipliers 1..4, m=1 with K < tp where allowed.
    for tp, (H, K) in itertools.product([1, 2, 4, 8], [(8, 8), (8, 2), (16, 4), (8, 1), (16, 2)]):
        for m in range(1, 5):
            try:
                GQAQKVColumnParallelLinearSpec.create(num_attention_heads=H, num_key_value_heads=K, head_dim=4, tp_size=tp, kv_size_multiplier=m)
            except SpecError:
                continue
            for fuse_qkv, bias, layout in itertools.product([False, True], [False, True], ["tiled", "interleaved"]):
                yield tp, H, K, m, fuse_qkv, bias, layout


GQA_CASES = list(_gqa_cases())


def test_the_gqa_grid_covers_every_multiplier():
    assert {m for _, _, _, m, *_ in GQA_CASES} == {1, 2, 4}  # 3 divides no GQA group here
    assert any(m == 1 and K < H and tp > 1 for tp, H, K, m, *_ in GQA_CASES)  # a GQA layer without replication
    assert any(K < tp for tp, _, K, *_ in GQA_CASES)  # fewer key/value heads than ranks


def _attention(H: int, K: int, bias: bool, lora: bool, head_dim: int = 4, hidden: int = 12, r: int = 3) -> dict[str, torch.Tensor]:
    sizes = {"q": H * head_dim, "k": K * head_dim, "v": K * head_dim}
    state = {f"{MODULE}.{p}_proj.weight": _random((n, hidden), i) for i, (p, n) in enumerate(sizes.items())}
    state[f"{MODULE}.o_proj.weight"] = _random((hidden, H * head_dim), 3)
    if bias:
        state.update({f"{MODULE}.{p}_proj.bias": _random((n,), 10 + i) for i, (p, n) in enumerate(sizes.items())})
    if lora:
        for i, (p, n) in enumerate(sizes.items()):
            state[f"{MODULE}.{p}_proj.lora_A.weight"] = _random((r, hidden), 20 + i)
            state[f"{MODULE}.{p}_proj.lora_B.weight"] = _random((n, r), 30 + i)
        state[f"{MODULE}.o_proj.lora_A.weight"] = _random((r, H * head_dim), 40)
    return state


@pytest.mark.parametrize("tp,H,K,m,fuse_qkv,bias,layout", GQA_CASES)
def test_gqa_piece_map(tmp_path, tp, H, K, m, fuse_qkv, bias, layout):
    spec = GQAQKVColumnParallelLinearSpec.create(
        num_attention_heads=H, num_key_value_heads=K, head_dim=4, tp_size=tp, kv_size_multiplier=m,
        fuse_qkv=fuse_qkv, bias=bias, kv_layout=layout,
    )  # fmt: skip
    original = _attention(H, K, bias, lora=True)
    _check(spec, original, _shards(spec, original), tmp_path)


@pytest.mark.parametrize("tp,H,K,m", [(2, 8, 2, 1), (4, 8, 2, 2), (8, 16, 2, 4)])
def test_gqa_piece_map_reads_optimum_neurons_shared_lora(tmp_path, tp, H, K, m):
    """optimum-neuron's shared lora_A (every projection's) and fused lora_B ([q; k; v] rows on each rank)."""
    spec = GQAQKVColumnParallelLinearSpec.create(num_attention_heads=H, num_key_value_heads=K, head_dim=4, tp_size=tp, kv_size_multiplier=m)
    original = _attention(H, K, bias=False, lora=True)
    shards = _shards(spec, original)
    gqa = f"{MODULE}.qkv_proj"
    shared = shards.pop(f"{gqa}.lora_A.weight_q")
    del shards[f"{gqa}.lora_A.weight_k"], shards[f"{gqa}.lora_A.weight_v"]
    parts = [shards.pop(f"{gqa}.lora_B.weight_{s}") for s in "qkv"]
    shards[f"{gqa}.lora_A.weight"] = shared
    shards[f"{gqa}.lora_B.weight"] = [torch.cat([p[r] for p in parts]) for r in range(tp)]
    expected = dict(original)
    for s in "kv":
        expected[f"{MODULE}.{s}_proj.lora_A.weight"] = original[f"{MODULE}.q_proj.lora_A.weight"]
    _check(spec, original, shards, tmp_path, expected)


@pytest.mark.parametrize(
    "tp,fuse_axis,bias,dims",
    [(tp, axis, bias, dims) for tp in (1, 2, 4, 8) for axis in (0, 1) for bias in (False, True) for dims in ([16, 16], [8, 24, 16])],
)  # fmt: skip
def test_fused_linears_piece_map(tmp_path, tp, fuse_axis, bias, dims):
    names = [f"p{i}" for i in range(len(dims))]
    spec = FusedLinearsSpec("fused", names, bias, fuse_axis, dims, tp_size=tp)
    other, r = 6, 2
    original = {}
    for i, (name, d) in enumerate(zip(names, dims)):
        original[f"{MODULE}.{name}.weight"] = _random((d, other) if fuse_axis == 0 else (other, d), i)
        if bias:
            original[f"{MODULE}.{name}.bias"] = _random((d if fuse_axis == 0 else other,), 10 + i)
        original[f"{MODULE}.{name}.lora_A.weight"] = _random((r, other if fuse_axis == 0 else d), 20 + i)
        original[f"{MODULE}.{name}.lora_B.weight"] = _random((d if fuse_axis == 0 else other, r), 30 + i)
    _check(spec, original, _shards(spec, original), tmp_path)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fused_linears_piece_map_reads_optimum_neurons_shared_lora(tmp_path, tp):
    spec = FusedLinearsSpec("gate_up_proj", ["gate_proj", "up_proj"], False, 0, [16, 8], tp_size=tp)
    original = {f"{MODULE}.gate_proj.weight": _random((16, 6), 0), f"{MODULE}.up_proj.weight": _random((8, 6), 1)}
    shards = _shards(spec, original)
    a, b_gate, b_up = _random((2, 6), 2), _random((16, 2), 3), _random((8, 2), 4)
    shards[f"{MODULE}.gate_up_proj.lora_A.weight"] = [a] * tp
    shards[f"{MODULE}.gate_up_proj.lora_B.weight"] = [
        torch.cat([b_gate.chunk(tp)[rank], b_up.chunk(tp)[rank]]) for rank in range(tp)
    ]
    expected = dict(original)
    expected.update({
        f"{MODULE}.gate_proj.lora_A.weight": a, f"{MODULE}.up_proj.lora_A.weight": a,
        f"{MODULE}.gate_proj.lora_B.weight": b_gate, f"{MODULE}.up_proj.lora_B.weight": b_up,
    })  # fmt: skip
    _check(spec, original, shards, tmp_path, expected)


def test_inverting_a_layout_takes_the_first_holder_and_names_gaps():
    layouts = [
        SavedLayout("s", 0, ((Block("a", 2, 4), Block("a", 0, 2)), (Block("a", 0, 4),))),  # rank 1: a replica
        replicated("t", "b", 5, 2),
        sharded("u", "c", 8, 2, 1, stride=2),
    ]
    shapes = {"s": (4, 3), "t": (5,), "u": (3, 4)}
    (a, b, c) = original_layouts(layouts, shapes, ["s", "t", "u"])
    assert (a.name, a.shape, a.provenance) == ("a", (4, 3), RowCopy(((0, 0, 2, 4), (0, 0, 0, 2))))
    assert (b.shape, b.provenance) == ((5,), RowCopy(((1, 0, 0, 5),)))
    assert (c.shape, c.provenance) == ((3, 8), ColumnGather(((2, 0, 0, 2), (2, 1, 0, 2), (2, 0, 2, 4), (2, 1, 2, 4))))
    with pytest.raises(SpecError, match="held by no rank"):
        original_layouts([SavedLayout("s", 0, ((Block("a", 0, 2), Block("a", 3, 4)),))], {"s": (3, 1)}, ["s"])


# The walkthrough of docs/concepts.md ("Adding a weight transformation spec"), as written there.


@dataclasses.dataclass
class FusedKVFields:
    kv_proj_name: str
    kv_rows: int  # rows of k_proj, and of v_proj
    tp_size: int

    def get_relevant_parameter_names(self, module):
        return {f"{module}.{self.kv_proj_name}.weight", f"{module}.k_proj.weight", f"{module}.v_proj.weight"}

    def field_problem(self):
        return None if self.kv_rows % self.tp_size == 0 else f"kv_rows={self.kv_rows} over tp_size={self.tp_size}"

    def kv_layout(self, module):
        n = self.kv_rows // self.tp_size
        ranks = tuple(
            (Block(f"{module}.k_proj.weight", r * n, (r + 1) * n), Block(f"{module}.v_proj.weight", r * n, (r + 1) * n))
            for r in range(self.tp_size)
        )
        return SavedLayout(f"{module}.{self.kv_proj_name}.weight", 0, ranks)

    def saved_layouts(self, module, shapes):
        layout = self.kv_layout(module)
        return [layout] if layout.name in shapes else []


@dataclasses.dataclass
class FusedKVSpec(FusedKVFields, FusedModuleSpec, ModelWeightTransformationSpec):  # not registered: the test registry stays as shipped
    def adapt_state_dict(self, module, state_dict, tp_rank):
        originals = [f"{module}.k_proj.weight", f"{module}.v_proj.weight"]
        if not all(n in state_dict for n in originals):
            return {}, []
        layout = self.kv_layout(module)
        return {layout.name: gather_saved(layout, tp_rank, state_dict)}, originals

    def to_original_weights(self, module, sharded_state_dicts, parameters_metadata):
        return spec_to_original(self, module, sharded_state_dicts)

    def with_tp_size(self, tp_size):
        return dataclasses.replace(self, tp_size=tp_size)

    def fused_projections(self):
        names = ("k_proj", "v_proj")
        return {self.kv_proj_name: FusedProjections(names, names, (self.kv_rows, self.kv_rows))}


@dataclasses.dataclass
class DeclaredFusedKV(FusedKVFields, DeclaredLayout):
    spec_name = "FusedKVSpec"


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_the_documented_new_spec_needs_nothing_else(tmp_path, monkeypatch, tp):
    monkeypatch.setitem(DECLARED_SPECS, "FusedKVSpec", DeclaredFusedKV.from_fields)
    spec = FusedKVSpec("kv_proj", 8, tp)
    original = {f"{MODULE}.k_proj.weight": _random((8, 6), 0), f"{MODULE}.v_proj.weight": _random((8, 6), 1)}
    shards = _shards(spec, original)
    assert torch.equal(shards[f"{MODULE}.kv_proj.weight"][tp - 1][: 8 // tp], original[f"{MODULE}.k_proj.weight"][-(8 // tp):])
    _check(spec, original, shards, tmp_path)
    resharded = spec.with_tp_size(2 * tp)  # what `reshard` calls
    (tmp_path / "resharded").mkdir()
    _check(resharded, original, _shards(resharded, original), tmp_path / "resharded")
    adapted = spec.adapt_peft_config(LoraConfig(target_modules=["k_proj"]))  # FusedModuleSpec, from fused_projections
    assert adapted.target_modules == {"k_proj", "kv_proj"}
    assert spec.to_original_peft_config(adapted).target_modules == {"k_proj"}
