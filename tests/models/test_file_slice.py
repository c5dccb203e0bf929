"""`FileSlice` and the safetensors header reader of `models.loading`: every index form the sharding functions use,
fp32 and bf16, against safetensors' own slicing; truncated and corrupted files."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from optimum_neuron_peft.errors import CheckpointError
from optimum_neuron_peft.models import AutoModelForCausalLM
from optimum_neuron_peft.models.loading import FileSlice, read_safetensors_header

# The forms `narrow` / `materialize` / `take_blocks` build: a dim-0 range, a dim-1 range, everything.
INDEXES_2D = [(slice(4, 12),), (slice(0, 16),), (slice(15, 16),), (slice(3, 3),), (slice(None), slice(8, 20)),
              (slice(None), slice(0, 24)), (slice(None), slice(23, 24)), (slice(None), slice(None))]  # fmt: skip
INDEXES_1D = [(slice(None),), (slice(2, 7),)]


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def stored(request, tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    tensors = {  # an odd-sized tensor first, so the others start at unaligned offsets
        "odd": torch.randn(3, generator=gen).to(request.param),
        "w": torch.randn(16, 24, generator=gen).to(request.param),
        "b": torch.randn(10, generator=gen).to(request.param),
    }
    path = tmp_path_factory.mktemp("slices") / "t.safetensors"
    save_file(tensors, path)
    return path, tensors


def _slice(path, name):
    dtype, shape = read_safetensors_header(path)[name]
    return FileSlice(path, name, shape, dtype)


@pytest.mark.parametrize("name,indexes", [("w", INDEXES_2D), ("b", INDEXES_1D), ("odd", INDEXES_1D[:1])])
def test_every_index_form_matches_safetensors(stored, name, indexes):
    path, tensors = stored
    piece = _slice(path, name)
    assert piece.get_shape() == list(tensors[name].shape) and piece.shape == tuple(tensors[name].shape)
    with safe_open(str(path), framework="pt") as f:
        reference = f.get_slice(name)
        for index in indexes:
            got = piece[index]
            assert got.dtype == tensors[name].dtype
            assert torch.equal(got, reference[index]), index
            assert torch.equal(got, tensors[name][index]), index


def test_header_matches_safetensors(stored):
    path, tensors = stored
    header = read_safetensors_header(path)
    with safe_open(str(path), framework="pt") as f:
        assert set(header) == set(f.keys())
        for name in f.keys():
            assert header[name] == (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape()))


def test_writing_a_slice_leaves_the_file_alone(stored, tmp_path):
    """Row slices are views of a private map: in-place updates (full fine-tuning) must not reach the checkpoint."""
    path, tensors = stored
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(path.read_bytes())
    rows = _slice(copy, "w")[(slice(0, 4),)]
    rows.add_(1)
    assert torch.equal(load_file(copy)["w"], tensors["w"])


def _truncate(path, drop):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - drop])


def test_truncated_file(stored, tmp_path):
    path, _ = stored
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes())
    _truncate(cut, 4)
    message = r"cut\.safetensors: tensor \w+ needs data bytes up to \d+, the file holds only \d+ \(truncated"
    with pytest.raises(CheckpointError, match=message):
        read_safetensors_header(cut)


def test_file_truncated_after_its_header_was_read(stored, tmp_path):
    path, _ = stored
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(path.read_bytes())
    piece = _slice(copy, "w")
    _truncate(copy, 4)
    with pytest.raises(CheckpointError, match=r"copy\.safetensors: cannot read tensor w: "):
        piece[(slice(0, 2),)]


@pytest.mark.parametrize(
    "content,message",
    [(b"\x01\x02", "header length"), ((10**9).to_bytes(8, "little") + b"{}", "header length"),
     (len(b"[1]").to_bytes(8, "little") + b"[1]", "JSON list"), (len(b"{x").to_bytes(8, "little") + b"{x", "not JSON"),
     (len(b'{"w": {"dtype": "F32"}}').to_bytes(8, "little") + b'{"w": {"dtype": "F32"}}', "unreadable entry for tensor w")],
)  # fmt: skip
def test_corrupted_header(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors: not a valid safetensors file \(.*{message}"):
        read_safetensors_header(path)


def _small_llama(path, **save_kw):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True, **save_kw)
    return path


def test_truncated_checkpoint_fails_naming_the_file(tmp_path):
    single = _small_llama(tmp_path / "single")
    _truncate(single / "model.safetensors", 100)
    with pytest.raises(CheckpointError, match=r"single/model\.safetensors: tensor .* \(truncated"):
        AutoModelForCausalLM.from_pretrained(single)
    sharded = _small_llama(tmp_path / "sharded", max_shard_size="20KB")
    shard = sorted(sharded.glob("*.safetensors"))[-1]
    _truncate(shard, 100)
    with pytest.raises(CheckpointError, match=rf"{shard.name}: tensor .* \(truncated"):
        AutoModelForCausalLM.from_pretrained(sharded)


def test_index_naming_the_wrong_file(tmp_path):
    path = _small_llama(tmp_path, max_shard_size="20KB")
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    files = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][name] = files[1]
    index_file.write_text(json.dumps(index))
    message = rf"{files[1]}: the index places tensor {name} in this file, but it is not there"
    with pytest.raises(CheckpointError, match=message):
        AutoModelForCausalLM.from_pretrained(path)
