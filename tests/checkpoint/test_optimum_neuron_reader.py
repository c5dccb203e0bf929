"""Writer -> discovery -> lazy reading of optimum-neuron training checkpoints (docs/checkpoint_formats.md section 3)."""

from __future__ import annotations

import json
import os
import pickle
import sys
import types
import weakref
import zipfile
from pathlib import Path

import pytest
import torch

from optimum_neuron_peft.checkpoint.optimum_neuron import (
    OptimumNeuronCheckpoint,
    adapter_key_from_metadata_name,
    load_metadata,
    normalize_fuse_axis,
    normalize_parameters_metadata,
    open_rank_file,
)
from optimum_neuron_writer import write_optimum_neuron_checkpoint
from optimum_neuron_peft.errors import CheckpointError, UnsafePickleError

TP = 2
LAYER = "model.layers.{}"


def sharded(dim: int, tp: int = TP) -> dict:
    return {"tensor_model_parallel": True, "partition_dim": dim, "partition_stride": 1, "num_partitions": tp}


def model_metadata(pp_rank: int, tp: int = TP) -> dict:
    # Each pipeline stage lists only its own layer, as optimum-neuron does.
    layer = LAYER.format(pp_rank)
    return {
        "parameters": {
            f"{layer}.self_attn.qkv_proj.weight_q": sharded(0, tp),
            f"{layer}.self_attn.qkv_proj.weight_qkv": {"tensor_model_parallel": False},
            f"{layer}.self_attn.o_proj.weight": sharded(1, tp),
            f"{layer}.mlp.gate_up_proj.weight": sharded(0, tp),
            f"{layer}.input_layernorm.weight": {"tensor_model_parallel": False},
        },
        "model_weight_transformation_specs": [
            {
                "module_fully_qualified_name": f"{layer}.mlp",
                "specs": [
                    [
                        "FusedLinearsSpec",
                        {
                            "fused_linear_name": "gate_up_proj",
                            "linear_names": ["gate_proj", "up_proj"],
                            "bias": False,
                            "fuse_axis": pp_rank % 2,
                            "original_dims": [8, 8],
                            "tp_size": tp,
                            "peft_type": None,
                        },
                    ]
                ],
            }
        ],
    }


def model_rank_state(tp_rank: int, pp_rank: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * pp_rank + tp_rank)
    layer = LAYER.format(pp_rank)
    big = torch.randn(8, 12, generator=gen)
    return {
        f"{layer}.self_attn.qkv_proj.weight_q": torch.randn(4, 6, generator=gen).to(torch.bfloat16),
        f"{layer}.self_attn.qkv_proj.weight_qkv": torch.randn(8, 6, generator=gen).to(torch.float16),
        f"{layer}.self_attn.o_proj.weight": big[:, 2:5],  # non-contiguous view of a bigger storage
        f"{layer}.mlp.gate_up_proj.weight": big[4:],  # view at a storage offset
        f"{layer}.input_layernorm.weight": torch.randn(6, generator=gen),
        f"{layer}.positions": torch.arange(5, dtype=torch.int64) * (tp_rank + 1),
    }


def write_model(root: Path, serialization: str = "plain", pp: int = 2, tp: int = TP, metadata_format: str = "json"):
    states = {(t, p): model_rank_state(t, p) for p in range(pp) for t in range(tp)}
    write_optimum_neuron_checkpoint(
        root,
        states,
        {p: model_metadata(p, tp) for p in range(pp)},
        serialization=serialization,
        config={"model_type": "llama"},
        metadata_format=metadata_format,
    )
    return states


def assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    as_bytes = lambda t: torch.empty(t.shape, dtype=t.dtype).copy_(t).view(-1).view(torch.uint8)  # noqa: E731
    assert torch.equal(as_bytes(actual), as_bytes(expected))


# ---------------------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("serialization", ["plain", "xser"])
@pytest.mark.parametrize("metadata_format", ["json", "pt"])
def test_model_round_trip(tmp_path, serialization, metadata_format):
    states = write_model(tmp_path, serialization, metadata_format=metadata_format)
    ckpt = OptimumNeuronCheckpoint.discover(tmp_path)
    part = ckpt.model
    assert (part.tp_size, part.pp_size, part.serialization) == (TP, 2, serialization)
    assert ckpt.adapters == {} and ckpt.config_file == tmp_path / "config.json"
    assert set(part.rank_files) == set(states)
    assert part.metadata_files[1].name == f"mp_metadata_pp_rank_1.{metadata_format}"
    assert part.metadata == {p: model_metadata(p) for p in range(2)}
    for key, path in part.rank_files.items():
        assert path.name == f"dp_rank_00_tp_rank_{key[0]:02d}_pp_rank_{key[1]:02d}.pt"
        lazy = open_rank_file(path)
        assert list(lazy) == list(states[key])
        for name, handle in lazy.items():
            assert handle.name == name
            assert_bit_equal(handle.load(), states[key][name])
        if serialization == "plain":
            reference = torch.load(path, weights_only=True)
            for name, handle in lazy.items():
                assert_bit_equal(handle.load(), reference[name])
        else:
            assert lazy[next(iter(lazy))].file == Path(f"{path}.tensors") / "tensor_0.pt"


def test_adapter_layout(tmp_path):
    write_model(tmp_path, pp=1)
    adapter_metadata = model_metadata(0)
    layer = LAYER.format(0)
    adapter_metadata["parameters"] = {
        f"{layer}.self_attn.qkv_proj.base_layer.weight_q": sharded(0),
        f"{layer}.self_attn.qkv_proj.lora_A.default.weight": {"tensor_model_parallel": False},
        f"{layer}.self_attn.qkv_proj.lora_B.default.weight_q": sharded(0),
    }
    states = {
        (t, 0): {
            f"{layer}.self_attn.qkv_proj.lora_A.weight": torch.full((4, 6), float(t)),
            f"{layer}.self_attn.qkv_proj.lora_B.weight_q": torch.full((3, 4), float(t + 10)),
        }
        for t in range(TP)
    }
    lora_config = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj", "k_proj", "v_proj"]}
    write_optimum_neuron_checkpoint(
        tmp_path, states, {0: adapter_metadata}, "xser", adapter_name="default", adapter_config=lora_config
    )
    ckpt = OptimumNeuronCheckpoint.discover(tmp_path)
    adapter = ckpt.adapters["default"]
    assert ckpt.model is not None and ckpt.model.pp_size == 1
    assert adapter.adapter_name == "default" and adapter.tp_size == TP and adapter.serialization == "xser"
    assert adapter.directory == tmp_path / "adapter_default" / "adapter_shards"
    assert json.loads(adapter.adapter_config.read_text()) == lora_config
    lazy = open_rank_file(adapter.rank_files[(1, 0)])  # keys as on disk: named from the PEFT wrapper
    # Discovery removed the wrapper prefix from the metadata and recorded it; metadata names carry the adapter name,
    # rank files do not: the helper bridges them.
    assert adapter.key_prefix == "base_model.model."
    assert all(not n.startswith("base_model.") for n in adapter.metadata[0]["parameters"])
    keys = {adapter_key_from_metadata_name(n, "default") for n in adapter.metadata[0]["parameters"]} - {None}
    assert {adapter.key_prefix + k for k in keys} == set(lazy)
    assert torch.equal(lazy[f"base_model.model.{layer}.self_attn.qkv_proj.lora_B.weight_q"].load(), torch.full((3, 4), 11.0))


def test_adapter_only_checkpoint_and_root_files(tmp_path):
    write_optimum_neuron_checkpoint(
        tmp_path, {(0, 0): {"a.lora_A.weight": torch.ones(2, 2)}}, {0: {"parameters": {}}}, adapter_name="x",
        adapter_config={"r": 2},
    )
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("not copied")
    ckpt = OptimumNeuronCheckpoint.discover(tmp_path)
    assert ckpt.model is None and list(ckpt.adapters) == ["x"] and ckpt.adapters["x"].tp_size == 1
    assert ckpt.config_file is None and ckpt.extra_files == (tmp_path / "tokenizer.json",)


def test_xser_reference_file_is_what_torch_xla_reads(tmp_path, monkeypatch):
    # Load our reference file with torch's own unpickler and a fake torch_xla module: same class name, same field.
    write_model(tmp_path, "xser", pp=1)
    fake = types.ModuleType("torch_xla.utils.serialization")

    class TensorReference:
        pass

    fake.TensorReference = TensorReference
    for name in ("torch_xla", "torch_xla.utils"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "torch_xla.utils.serialization", fake)
    path = tmp_path / "shards" / "model" / "dp_rank_00_tp_rank_01_pp_rank_00.pt"
    refs = torch.load(path, weights_only=False)
    assert all(type(ref) is TensorReference for ref in refs.values())
    assert [ref.tid for ref in refs.values()] == list(range(len(refs)))
    assert vars(next(iter(refs.values()))) == {"tid": 0}


def test_writer_streams_one_rank_at_a_time(tmp_path):
    alive = []

    def generate():
        for tp in range(3):
            # The previous rank's tensors must be gone before the next rank is built.
            assert all(ref() is None for ref in alive)
            state = {"w": torch.full((4,), float(tp))}
            alive.append(weakref.ref(state["w"]))
            yield (tp, 0), state
            del state

    write_optimum_neuron_checkpoint(tmp_path, generate(), {0: {"parameters": {"w": sharded(0, 3)}}})
    assert len(alive) == 3
    part = OptimumNeuronCheckpoint.discover(tmp_path).model
    assert part.tp_size == 3
    assert torch.equal(open_rank_file(part.rank_files[(2, 0)])["w"].load(), torch.full((4,), 2.0))


def test_ignored_siblings(tmp_path):
    write_model(tmp_path, "xser", pp=1)
    shards = tmp_path / "shards"
    (shards / "optim").mkdir()
    (shards / "optim" / "dp_rank_00_tp_rank_00_pp_rank_00.pt").write_bytes(b"junk")
    (shards / "model" / "dp_rank_00_tp_rank_00_pp_rank_00.pt.info.pt").write_bytes(b"junk")
    (shards / "model" / "dp_rank_01_tp_rank_05_pp_rank_00.pt").write_bytes(b"junk")  # dp rank 1 never holds the model
    part = OptimumNeuronCheckpoint.discover(tmp_path).model
    assert part.tp_size == TP and len(part.rank_files) == TP
    assert (shards / "checkpoint").exists() and (shards / "done").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Metadata quirks


def test_normalize_parameters_metadata():
    metadata = model_metadata(0)
    cleaned = normalize_parameters_metadata(metadata)
    qkv = f"{LAYER.format(0)}.self_attn.qkv_proj.weight_qkv"
    assert cleaned["parameters"][qkv] == sharded(0)
    assert metadata["parameters"][qkv] == {"tensor_model_parallel": False}  # the input is left as on disk
    norm = f"{LAYER.format(0)}.input_layernorm.weight"
    assert cleaned["parameters"][norm] == {"tensor_model_parallel": False}
    assert normalize_parameters_metadata(metadata, tp_size=8)["parameters"][qkv]["num_partitions"] == 8
    assert [normalize_fuse_axis(v) for v in (0, 1, "column", "row")] == ["column", "row", "column", "row"]
    with pytest.raises(CheckpointError, match="fuse_axis"):
        normalize_fuse_axis(2)


def test_adapter_key_from_metadata_name():
    key = adapter_key_from_metadata_name("m.qkv_proj.lora_B.default.weight_q", "default")
    assert key == "m.qkv_proj.lora_B.weight_q"
    assert adapter_key_from_metadata_name("m.qkv_proj.base_layer.weight_q", "default") is None
    assert adapter_key_from_metadata_name("m.default.lora_A.other.weight", "default") is None


def test_metadata_errors(tmp_path):
    bad = tmp_path / "mp_metadata_pp_rank_0.json"
    bad.write_text("{not json")
    with pytest.raises(CheckpointError, match="mp_metadata_pp_rank_0.json"):
        load_metadata(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a metadata dict, found list"):
        load_metadata(bad)


# ---------------------------------------------------------------------------------------------------------------------
# Malicious files inside a checkpoint


class _Touch:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_zip(path: Path, obj) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{path.stem}/data.pkl", pickle.dumps(obj, protocol=2, fix_imports=False))
        archive.writestr(f"{path.stem}/byteorder", b"little")


def test_malicious_xser_reference_file(tmp_path):
    write_model(tmp_path, "xser", pp=1)
    marker = tmp_path / "pwned"
    path = tmp_path / "shards" / "model" / "dp_rank_00_tp_rank_01_pp_rank_00.pt"
    _evil_zip(path, {"w": _Touch(marker)})
    part = OptimumNeuronCheckpoint.discover(tmp_path).model  # discovery reads no rank file
    with pytest.raises(UnsafePickleError, match=r"dp_rank_00_tp_rank_01_pp_rank_00\.pt.*posix\.system"):
        open_rank_file(part.rank_files[(1, 0)])
    assert not marker.exists()


def test_malicious_xser_tensor_file(tmp_path):
    write_model(tmp_path, "xser", pp=1)
    marker = tmp_path / "pwned"
    tensors_dir = tmp_path / "shards" / "model" / "dp_rank_00_tp_rank_00_pp_rank_00.pt.tensors"
    _evil_zip(tensors_dir / "tensor_2.pt", _Touch(marker))
    with pytest.raises(UnsafePickleError, match=r"tensor_2\.pt"):
        open_rank_file(tmp_path / "shards" / "model" / "dp_rank_00_tp_rank_00_pp_rank_00.pt")
    assert not marker.exists()


def test_malicious_pt_metadata(tmp_path):
    write_model(tmp_path, pp=1, metadata_format="pt")
    marker = tmp_path / "pwned"
    (tmp_path / "shards" / "mp_metadata_pp_rank_0.pt").write_bytes(
        pickle.dumps({"parameters": _Touch(marker)}, protocol=2, fix_imports=False)
    )
    with pytest.raises(UnsafePickleError, match=r"mp_metadata_pp_rank_0\.pt.*posix\.system"):
        OptimumNeuronCheckpoint.discover(tmp_path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------------
# Broken or inconsistent checkpoints


def _model_dir(root: Path) -> Path:
    return root / "shards" / "model"


def test_missing_rank_file(tmp_path):
    write_model(tmp_path, tp=4, pp=1)
    (_model_dir(tmp_path) / "dp_rank_00_tp_rank_02_pp_rank_00.pt").unlink()
    with pytest.raises(CheckpointError, match=r"dp_rank_00_tp_rank_02_pp_rank_00\.pt: missing rank file.*\[0, 1, 3\]"):
        OptimumNeuronCheckpoint.discover(tmp_path)


def test_missing_rank_file_in_one_stage(tmp_path):
    write_model(tmp_path, pp=2)
    (_model_dir(tmp_path) / "dp_rank_00_tp_rank_01_pp_rank_01.pt").unlink()
    with pytest.raises(CheckpointError, match=r"dp_rank_00_tp_rank_01_pp_rank_01\.pt: missing rank file"):
        OptimumNeuronCheckpoint.discover(tmp_path)


def test_stage_without_metadata(tmp_path):
    write_model(tmp_path, pp=2)
    (tmp_path / "shards" / "mp_metadata_pp_rank_1.json").unlink()
    with pytest.raises(CheckpointError, match=r"mp_metadata_pp_rank_1\.json: expected metadata for pipeline stage 1"):
        OptimumNeuronCheckpoint.discover(tmp_path)


def test_missing_pipeline_stage(tmp_path):
    write_model(tmp_path, pp=3)
    for tp in range(TP):
        (_model_dir(tmp_path) / f"dp_rank_00_tp_rank_{tp:02d}_pp_rank_01.pt").unlink()
    with pytest.raises(CheckpointError, match=r"pp ranks.*missing \[1\]"):
        OptimumNeuronCheckpoint.discover(tmp_path)


def test_metadata_tp_disagrees_with_rank_files(tmp_path):
    write_model(tmp_path, pp=1, tp=2)
    meta = tmp_path / "shards" / "mp_metadata_pp_rank_0.json"
    meta.write_text(json.dumps(model_metadata(0, tp=4)))
    expected = r"mp_metadata_pp_rank_0\.json: parameter .* num_partitions=4.* 2 tp rank"
    with pytest.raises(CheckpointError, match=expected):
        OptimumNeuronCheckpoint.discover(tmp_path)


def test_xser_missing_and_truncated_tensor_files(tmp_path):
    write_model(tmp_path, "xser", pp=1)
    rank_file = _model_dir(tmp_path) / "dp_rank_00_tp_rank_00_pp_rank_00.pt"
    tensors = Path(f"{rank_file}.tensors")
    data = (tensors / "tensor_1.pt").read_bytes()
    (tensors / "tensor_1.pt").write_bytes(data[: len(data) - 40])
    with pytest.raises(CheckpointError, match=r"tensor_1\.pt"):
        open_rank_file(rank_file)
    (tensors / "tensor_1.pt").unlink()
    with pytest.raises(CheckpointError, match=r"tensor_1\.pt: expected the xser tensor file.*missing"):
        open_rank_file(rank_file)


def test_truncated_plain_rank_file(tmp_path):
    write_model(tmp_path, pp=1)
    rank_file = _model_dir(tmp_path) / "dp_rank_00_tp_rank_01_pp_rank_00.pt"
    os.truncate(rank_file, rank_file.stat().st_size - 100)
    with pytest.raises(CheckpointError, match=r"dp_rank_00_tp_rank_01_pp_rank_00\.pt"):
        open_rank_file(rank_file)


def test_mixed_serialization(tmp_path):
    write_model(tmp_path, "plain", pp=1)
    Path(f"{_model_dir(tmp_path) / 'dp_rank_00_tp_rank_01_pp_rank_00.pt'}.tensors").mkdir()
    with pytest.raises(CheckpointError, match="same serialization"):
        OptimumNeuronCheckpoint.discover(tmp_path)


def test_bad_roots(tmp_path):
    with pytest.raises(CheckpointError, match="empty directory"):
        OptimumNeuronCheckpoint.discover(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        OptimumNeuronCheckpoint.discover(tmp_path / "nope")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"found only: model\.safetensors"):
        OptimumNeuronCheckpoint.discover(tmp_path)
    write_model(tmp_path / "ckpt", pp=1)
    with pytest.raises(CheckpointError, match="pass the checkpoint root"):
        OptimumNeuronCheckpoint.discover(tmp_path / "ckpt" / "shards")
    (tmp_path / "ckpt2" / "shards" / "model").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="found none"):
        OptimumNeuronCheckpoint.discover(tmp_path / "ckpt2")


def test_adapter_without_config(tmp_path):
    write_optimum_neuron_checkpoint(tmp_path, {(0, 0): {"w": torch.ones(1)}}, {0: {}}, adapter_name="a")
    with pytest.raises(CheckpointError, match=r"adapter_a/adapter_config\.json: expected the adapter's LoRA config"):
        OptimumNeuronCheckpoint.discover(tmp_path)


class _ReferenceWithShape:
    def __init__(self, tid, shape, dtype):
        self.tid, self.shape, self.dtype = tid, shape, dtype


def test_reference_with_shape_and_dtype_is_cross_checked(tmp_path):
    # Neuron's variant of TensorReference also records shape and dtype; a disagreement with the tensor file is an error.
    write_model(tmp_path, "xser", pp=1)
    rank_file = _model_dir(tmp_path) / "dp_rank_00_tp_rank_00_pp_rank_00.pt"
    good = open_rank_file(rank_file)
    name, handle = next(iter(good.items()))
    for shape, ok in ((handle.shape, True), (torch.Size([1, 2]), False)):
        data = pickle.dumps({name: _ReferenceWithShape(0, shape, handle.dtype)}, protocol=2)
        data = data.replace(
            f"{__name__}\n_ReferenceWithShape".encode(), b"torch_xla.utils.serialization\nTensorReference"
        )
        with zipfile.ZipFile(rank_file, "w") as archive:
            archive.writestr("ref/data.pkl", data)
        if ok:
            assert open_rank_file(rank_file)[name] == handle
        else:
            with pytest.raises(CheckpointError, match=r"tensor_0\.pt: reference .* expects shape"):
                open_rank_file(rank_file)
