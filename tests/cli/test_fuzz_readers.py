"""Property-based fuzzing of every reader of untrusted bytes: random and mutated inputs either read or raise the
project's own error type (`OptimumNeuronPeftError`), never anything else (no KeyError, TypeError, RecursionError,
MemoryError, no traceback in the CLI)."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import math
import struct
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from optimum_neuron_peft.checkpoint.optimum_neuron import load_metadata, normalize_parameters_metadata, open_rank_file
from optimum_neuron_peft.checkpoint.schemas import read_index_files
from optimum_neuron_peft.checkpoint.native_format import read_manifest
from optimum_neuron_peft.formats.stored_tensor import read_safetensors_header
from optimum_neuron_peft.formats.torch_zip import open_torch_dict
from optimum_neuron_peft.errors import OptimumNeuronPeftError
from optimum_neuron_peft.merging.adapter_io import load_adapter
from optimum_neuron_peft.transformations.metadata import parse_metadata

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "checkpoint"))  # the test fixtures' writer
from optimum_neuron_writer import write_xser_rank_file  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "120")), deadline=None, suppress_health_check=list(HealthCheck), database=None)
WORK = Path(tempfile.mkdtemp(prefix="fuzz-readers-"))  # one directory for every example (hypothesis reruns a test)
atexit.register(shutil.rmtree, WORK, ignore_errors=True)


def _valid_files() -> dict[str, bytes]:
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    save_file(tensors, WORK / "valid.safetensors", metadata={"format": "pt"})
    torch.save(tensors, WORK / "valid.pt")
    write_xser_rank_file(WORK / "xser.pt", tensors)
    return {name: (WORK / name).read_bytes() for name in ("valid.safetensors", "valid.pt", "xser.pt")}


VALID = _valid_files()
METADATA = json.loads((FIXTURES / "mp_metadata_pp_rank_0.json").read_text())
ADAPTER_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "use_rslora": False,
                  "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": None}  # fmt: skip
MANIFEST = {"format": "optimum-neuron-peft-sharded", "format_version": 1, "kind": "model", "tp_size": 1, "pp_size": 1,
            "dtype": "float32", "adapters": [], "files": {"config.json": {"size": 2, "sha256": "0" * 64}}}  # fmt: skip
INDEX = {"metadata": {"total_size": 8}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=24,
)


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """``data`` with a few bytes replaced, then maybe truncated or extended."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, len(out) - 1))
        out[position] = draw(st.integers(0, 255))
    cut = draw(st.one_of(st.none(), st.integers(0, len(out))))
    if cut is not None:
        out = out[:cut]
    return bytes(out) + draw(st.binary(max_size=16))


def _leaf_paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _leaf_paths(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _leaf_paths(child, (*path, index))


@st.composite
def json_mutated(draw, document):
    """``document`` with one value (at any depth) replaced by a random JSON value."""
    paths = list(_leaf_paths(document))
    path = draw(st.sampled_from(paths))
    replacement = draw(json_values)
    if not path:
        return replacement
    copy = json.loads(json.dumps(document))
    target = copy
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = replacement
    return copy


def _only_our_errors(read) -> None:
    try:
        read()
    except OptimumNeuronPeftError:
        pass


def _write(name: str, data: bytes | str) -> Path:
    path = WORK / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


@FUZZ
@given(st.one_of(mutated(VALID["valid.safetensors"]), st.binary(max_size=64)))
def test_safetensors_header(data):
    path = _write("fuzz.safetensors", data)
    try:
        read_safetensors_header(path)
    except OptimumNeuronPeftError:
        return
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:  # what we accept, the library accepts (no looser reading)
        for name in handle.keys():
            handle.get_tensor(name)


@FUZZ
@given(mutated(VALID["valid.pt"]))
def test_torch_zip(data):
    path = _write("fuzz.pt", data)
    _only_our_errors(lambda: [t.load() for t in open_torch_dict(path).values() if hasattr(t, "load")])


@FUZZ
@given(mutated(VALID["xser.pt"]))
def test_xser_reference(data):
    tensors_dir = WORK / "fuzz_xser.pt.tensors"
    if not tensors_dir.exists():
        tensors_dir.mkdir()
        for member in (WORK / "xser.pt.tensors").iterdir():
            (tensors_dir / member.name).write_bytes(member.read_bytes())
    path = _write("fuzz_xser.pt", data)
    _only_our_errors(lambda: [t.load() for t in open_rank_file(path).values()])


@st.composite
def safetensors_files(draw) -> bytes:
    """Structurally plausible safetensors files: right, or with overlapping, gapped, duplicate, fractional or
    negative offsets, wrong sizes, odd metadata, missing or trailing bytes."""
    header: dict = {}
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.sampled_from([{"format": "pt"}, {"n": 1}, None, [], {}]))
    offset = 0
    for i in range(draw(st.integers(0, 3))):
        dtype, size = draw(st.sampled_from([("F32", 4), ("BF16", 2), ("I64", 8), ("U8", 1)]))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        nbytes = size * math.prod(shape)
        begin = offset + draw(st.sampled_from([0, 0, 0, -1, 1, -offset]))
        end = begin + nbytes + draw(st.sampled_from([0, 0, 0, 1, -1]))
        offsets = draw(st.sampled_from([[begin, end], [begin, end], [float(begin), end], [begin, end + 0.5], [begin]]))
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        offset = max(offset, end)
    text = json.dumps(header).encode()
    text += b" " * draw(st.sampled_from([0, -len(text) % 8]))
    data = bytes(max(offset + draw(st.sampled_from([0, 0, 0, 1, -1])), 0))
    return struct.pack("<Q", len(text)) + text + data


@FUZZ
@given(safetensors_files())
def test_safetensors_header_is_exactly_as_strict_as_the_library(data):
    from safetensors import safe_open

    path = _write("strict.safetensors", data)
    try:
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                handle.get_tensor(name)
        library_accepts = True
    except Exception:  # noqa: BLE001 - the library's verdict
        library_accepts = False
    try:
        read_safetensors_header(path)
        we_accept = True
    except OptimumNeuronPeftError:
        we_accept = False
    assert we_accept == library_accepts


def _read_metadata(path: Path) -> None:
    metadata = normalize_parameters_metadata(load_metadata(path))
    parse_metadata(metadata, where=str(path))


@FUZZ
@given(st.one_of(json_mutated(METADATA), json_values))
def test_metadata_json(document):
    _only_our_errors(lambda: _read_metadata(_write("mp_metadata_pp_rank_0.json", json.dumps(document))))


@FUZZ
@given(mutated(json.dumps(METADATA).encode()))
def test_metadata_bytes(data):
    _only_our_errors(lambda: _read_metadata(_write("mp_metadata_pp_rank_0.json", data)))


@FUZZ
@given(st.one_of(json_mutated(INDEX), json_values, mutated(json.dumps(INDEX).encode())))
def test_index(document):
    data = document if isinstance(document, bytes) else json.dumps(document)
    _only_our_errors(lambda: read_index_files(_write("model.safetensors.index.json", data)))


@FUZZ
@given(st.one_of(json_mutated(MANIFEST), json_values))
def test_manifest(document):
    root = WORK / "manifest_root"
    root.mkdir(exist_ok=True)
    (root / "manifest.json").write_text(json.dumps(document))
    _only_our_errors(lambda: read_manifest(root))


@pytest.fixture(scope="module")
def adapter_dir():
    directory = WORK / "adapter"
    directory.mkdir(exist_ok=True)
    save_file({"base_model.model.q_proj.lora_A.weight": torch.ones(2, 4), "base_model.model.q_proj.lora_B.weight": torch.ones(4, 2)},
              directory / "adapter_model.safetensors")  # fmt: skip
    return directory


@FUZZ
@given(document=st.one_of(json_mutated(ADAPTER_CONFIG), json_values, mutated(json.dumps(ADAPTER_CONFIG).encode())))
def test_adapter_config(adapter_dir, document):
    data = document if isinstance(document, bytes) else json.dumps(document)
    (adapter_dir / "adapter_config.json").write_bytes(data if isinstance(data, bytes) else data.encode())

    def read():
        adapter = load_adapter(adapter_dir)
        for name, module in adapter.modules.items():  # what merging derives from the config
            assert isinstance(module.scaling, float) or isinstance(module.scaling, int)
        adapter.max_rank

    _only_our_errors(read)
