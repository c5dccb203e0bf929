"""`FileSlice` of `models.loading` and the safetensors header reader it uses: every index form the sharding
functions use, fp32 and bf16, against safetensors' own slicing; positioned row reads and the concatenations that use
them; truncated and corrupted files."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from optimum_neuron_peft.errors import CheckpointError, SpecError
from optimum_neuron_peft.models import AutoModelForCausalLM
from optimum_neuron_peft.formats.stored_tensor import read_safetensors_header
from optimum_neuron_peft.models.loading import FileSlice
from optimum_neuron_peft.transformations.sharding import gather_blocks, take_blocks

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
    return FileSlice(read_safetensors_header(path)[name])


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
            entry = header[name]
            assert (entry.dtype, entry.shape) == (str(tensors[name].dtype).removeprefix("torch."), tuple(f.get_slice(name).get_shape()))
            raw = path.read_bytes()[entry.offset : entry.offset + entry.nbytes]
            assert raw == tensors[name].contiguous().view(torch.uint8).numpy().tobytes()


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
    message = r"cut\.safetensors: tensor '\w+' needs data bytes \[\d+, \d+\), the file holds only \d+ \(truncated"
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
    [(b"\x01\x02", "expected an 8-byte safetensors header length, found 2 bytes"),
     ((10**9).to_bytes(8, "little") + b"{}", "safetensors header length 1000000000 exceeds the file size 10"),
     (len(b"[1]").to_bytes(8, "little") + b"[1]", "expected a JSON object as safetensors header, found list"),
     (len(b"{x").to_bytes(8, "little") + b"{x", "expected a safetensors file, could not read its header"),
     (len(b'{"w": {"dtype": "F32"}}').to_bytes(8, "little") + b'{"w": {"dtype": "F32"}}', "tensor 'w' has an unreadable header entry")],
)  # fmt: skip
def test_corrupted_header(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors: {re.escape(message)}"):
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


# -- positioned reads of rows (`read_rows_into`) and the concatenations that use them (`gather_blocks`) --------


@pytest.mark.parametrize("name,ranges", [("w", [(0, 16), (4, 12), (15, 16), (3, 3)]), ("b", [(0, 10), (2, 7)])])
def test_read_rows_into_matches_the_tensor(stored, name, ranges):
    path, tensors = stored
    piece = _slice(path, name)
    for start, stop in ranges:
        out = torch.full((stop - start, *tensors[name].shape[1:]), float("nan"), dtype=tensors[name].dtype)
        piece.read_rows_into(out, start, stop)
        assert torch.equal(out, tensors[name][start:stop]), (start, stop)


def test_read_rows_into_rejects_what_does_not_fit(stored):
    path, tensors = stored
    piece = _slice(path, "w")
    dtype = tensors["w"].dtype
    with pytest.raises(CheckpointError, match=r"t\.safetensors: tensor w \(16, 24\) .*cannot read rows \[10, 20\)"):
        piece.read_rows_into(torch.empty(10, 24, dtype=dtype), 10, 20)
    with pytest.raises(CheckpointError, match=r"into a \(2, 23\)"):
        piece.read_rows_into(torch.empty(2, 23, dtype=dtype), 0, 2)
    with pytest.raises(CheckpointError, match=r"into a \(2, 24\) torch.float64 tensor"):
        piece.read_rows_into(torch.empty(2, 24, dtype=torch.float64), 0, 2)
    with pytest.raises(CheckpointError, match="contiguous"):
        piece.read_rows_into(torch.empty(24, 2, dtype=dtype).t(), 0, 2)


def test_read_rows_into_a_file_truncated_after_its_header_was_read(stored, tmp_path):
    path, _ = stored
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(path.read_bytes())
    last = max(read_safetensors_header(copy).values(), key=lambda stored: stored.offset)
    piece = FileSlice(last)
    _truncate(copy, 4)
    with pytest.raises(CheckpointError, match=r"copy\.safetensors: expected \d+ bytes at offset \d+, found only \d+ \(file truncated\)"):
        piece.read_rows_into(torch.empty(piece.shape, dtype=piece.dtype), 0, piece.shape[0])


class _NoViews(FileSlice):
    """A FileSlice whose views fail: shows which path a concatenation took."""

    def __getitem__(self, index):
        raise AssertionError(f"{self.name} was read through a view")


def test_gather_blocks_reads_concatenated_rows_into_the_result(stored):
    path, tensors = stored
    header = read_safetensors_header(path)
    w = _NoViews(header["w"])
    got = gather_blocks([(w, [(12, 16), (0, 2), (2, 4)]), (w, [(5, 6)])], 0)
    expected = torch.cat([tensors["w"][12:16], tensors["w"][0:4], tensors["w"][5:6]])
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    assert torch.equal(take_blocks(w, 0, [(0, 4), (8, 12)]), torch.cat([tensors["w"][0:4], tensors["w"][8:12]]))


def test_gather_blocks_falls_back_to_torch_cat(stored):
    """Columns, or sources of different dtypes, go through views and torch.cat, with its type promotion."""
    path, tensors = stored
    w = FileSlice(read_safetensors_header(path)["w"])
    got = gather_blocks([(w, [(0, 8), (16, 24)])], 1)
    assert torch.equal(got, torch.cat([tensors["w"][:, 0:8], tensors["w"][:, 16:24]], dim=1))
    other = torch.randn(2, 24, dtype=torch.float64)
    got = gather_blocks([(w, [(0, 2)]), (other, [(0, 2)])], 0)
    assert got.dtype == torch.float64
    assert torch.equal(got, torch.cat([tensors["w"][0:2], other]))
    with pytest.raises(SpecError, match="no blocks given"):
        gather_blocks([], 0)


def test_tensor_at_an_unaligned_offset(tmp_path):
    """The format does not require a tensor to start at a multiple of its element size (our writers align, others
    may not): such a tensor is read through safetensors, with the same values."""
    values = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7
    header = {"u": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
              "w": {"dtype": "F32", "shape": [3, 4], "data_offsets": [3, 51]}}  # fmt: skip
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path / "unaligned.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + bytes([1, 2, 3]) + values.numpy().tobytes())
    piece = _slice(path, "w")
    assert piece.stored.offset % 4 != 0
    assert torch.equal(load_file(path)["w"], values)  # safetensors accepts the file
    for index in [(slice(1, 3),), (slice(None), slice(1, 3)), (slice(None),)]:
        assert torch.equal(piece[index], values[index]), index
    out = torch.empty(2, 4)
    piece.read_rows_into(out, 1, 3)
    assert torch.equal(out, values[1:3])
