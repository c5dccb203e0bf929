"""Lazy, restricted reading of torch.save zip files and safetensors headers."""

from __future__ import annotations

import os
import pickle
import subprocess
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from optimum_neuron_peft.formats.lazy_tensor import LazyTensor, open_safetensors
from optimum_neuron_peft.formats.torch_zip import (
    TensorReference,
    load_plain_pickle,
    open_torch_state_dict,
    open_torch_tensor,
    read_torch_file,
)
from optimum_neuron_peft.errors import CheckpointError, UnsafePickleError

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64]


def _random(shape, dtype, generator):
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.randint(-(2**40), 2**40, shape, generator=generator, dtype=dtype)


def assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    # Compare raw bytes so that NaN payloads and -0.0 count too.
    as_bytes = lambda t: torch.empty(t.shape, dtype=t.dtype).copy_(t).view(-1).view(torch.uint8)  # noqa: E731
    assert torch.equal(as_bytes(actual), as_bytes(expected))


# ---------------------------------------------------------------------------------------------------------------------
# Agreement with torch.load(weights_only=True)


def test_views_offsets_and_dtypes_match_torch_load(tmp_path):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=gen)
    state = {
        "column_slice": base[:, 1:4],  # strided view with gaps: torch.save stores the whole 6x10 storage
        "row_slice": base[2:4],  # contiguous view at a storage offset
        "transposed": base.t(),
        "expanded": torch.ones(3, 1).expand(3, 4),  # stride 0
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "parameter": torch.nn.Parameter(torch.randn(4, generator=gen)),
        "float8": torch.randn(5, generator=gen).to(torch.float8_e4m3fn),  # saved via _rebuild_tensor_v3
        **{f"dtype_{str(d).split('.')[-1]}": _random((3, 5), d, gen) for d in DTYPES},
    }
    path = tmp_path / "state.pt"
    torch.save(state, path)
    expected = torch.load(path, weights_only=True)
    lazy = open_torch_state_dict(path)
    assert list(lazy) == list(expected)
    for name, handle in lazy.items():
        assert handle.name == name and handle.file == path
        assert handle.shape == expected[name].shape and handle.dtype == expected[name].dtype
        loaded = handle.load()
        assert_bit_equal(loaded, expected[name])
        assert loaded.is_contiguous()
    # A view returns exactly the view, in memory of its own, not the 240-byte storage it was saved with.
    column = lazy["column_slice"].load()
    assert column.untyped_storage().nbytes() == 6 * 3 * 4
    assert lazy["row_slice"].read_nbytes == 2 * 10 * 4


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    dtype=st.sampled_from(DTYPES),
    start=st.integers(0, 2),
    step=st.integers(1, 3),
    transpose=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_slices_round_trip(shape, dtype, start, step, transpose, seed):
    gen = torch.Generator().manual_seed(seed)
    full = _random([d + 6 for d in shape], dtype, gen)
    view = full[tuple(slice(start, start + d * step, step) for d in shape)]
    if transpose and view.dim() > 1:
        view = view.transpose(0, -1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.pt"
        torch.save({"v": view}, path)
        assert_bit_equal(open_torch_state_dict(path)["v"].load(), torch.load(path, weights_only=True)["v"])
        assert_bit_equal(open_torch_state_dict(path)["v"].load(), view)


def test_single_tensor_file(tmp_path):
    tensor = torch.arange(12, dtype=torch.int64).reshape(3, 4)[1:]
    torch.save(tensor, tmp_path / "tensor_0.pt")
    handle = open_torch_tensor(tmp_path / "tensor_0.pt", "w")
    assert handle.name == "w"
    assert_bit_equal(handle.load(), tensor)


def test_loaded_tensor_owns_fresh_memory(tmp_path):
    torch.save({"w": torch.ones(4)}, tmp_path / "a.pt")
    handle = open_torch_state_dict(tmp_path / "a.pt")["w"]
    first, second = handle.load(), handle.load()
    first.add_(1)
    assert torch.equal(second, torch.ones(4))  # not a shared buffer
    assert first.untyped_storage().nbytes() == 16


def test_lazy_tensor_cannot_be_rewritten():
    handle = LazyTensor("w", torch.Size([2]), torch.float32, Path("x"), 0, 8)
    with pytest.raises(Exception):
        handle.file = Path("/etc/passwd")  # frozen
    with pytest.raises(AttributeError):
        handle.__dict__  # slots: pickle's BUILD has no dict to write into  # noqa: B018


# ---------------------------------------------------------------------------------------------------------------------
# Malicious pickles


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


class _Popen:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.Popen, (["touch", str(self.marker)],))


PAYLOADS = {"os.system": _System, "builtins.eval": _Eval, "subprocess.Popen": _Popen}
# How each callable is spelled in the pickle (os.system lives in module posix on Linux).
GLOBAL_NAMES = {"os.system": "posix.system", "builtins.eval": "builtins.eval", "subprocess.Popen": "subprocess.Popen"}


def evil_pickle(obj) -> bytes:
    # Protocol 2 like torch.save; fix_imports=False keeps the Python 3 module names (no __builtin__/commands aliases).
    return pickle.dumps(obj, protocol=2, fix_imports=False)


def write_torch_zip_with_pickle(path: Path, pickle_bytes: bytes, extra: dict[str, bytes] | None = None) -> None:
    """A well-formed torch.save archive whose data.pkl is ``pickle_bytes``."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickle_bytes)
        archive.writestr("archive/byteorder", b"little")
        archive.writestr("archive/version", b"3\n")
        for name, data in (extra or {}).items():
            archive.writestr(f"archive/{name}", data)


def test_payloads_work_when_unpickled_normally(tmp_path):
    # Control: each payload really has a side effect, so the rejection tests below can fail.
    for name, payload in PAYLOADS.items():
        marker = tmp_path / f"control_{name}"
        result = pickle.loads(pickle.dumps({"w": payload(marker)}, protocol=2))
        if isinstance(result["w"], subprocess.Popen):
            result["w"].wait()
        assert marker.exists(), name


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_malicious_torch_zip_is_rejected_without_side_effect(tmp_path, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    write_torch_zip_with_pickle(path, evil_pickle({"w": PAYLOADS[payload](marker)}))
    with pytest.raises(UnsafePickleError) as error:
        open_torch_state_dict(path)
    message = str(error.value)
    assert str(path) in message and GLOBAL_NAMES[payload] in message and "\n" not in message
    assert not marker.exists()


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_malicious_metadata_pickle_is_rejected(tmp_path, payload):
    marker = tmp_path / "pwned"
    raw = tmp_path / "meta_raw.pt"
    raw.write_bytes(evil_pickle({"parameters": {"w": PAYLOADS[payload](marker)}}))
    zipped = tmp_path / "meta_zip.pt"
    write_torch_zip_with_pickle(zipped, raw.read_bytes())
    for path in (raw, zipped):
        with pytest.raises(UnsafePickleError, match=GLOBAL_NAMES[payload]):
            load_plain_pickle(path)
    assert not marker.exists()


def test_metadata_pickle_refuses_even_harmless_globals_and_tensors(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"parameters": {}, "t": torch.ones(1)}, path)
    with pytest.raises(UnsafePickleError):
        load_plain_pickle(path)
    torch.save({"parameters": {"w": {"tensor_model_parallel": False}}, "n": [1, 2.0, None, True]}, path)
    assert load_plain_pickle(path) == {"parameters": {"w": {"tensor_model_parallel": False}}, "n": [1, 2.0, None, True]}


def test_tensor_reference_state_is_validated(tmp_path):
    # An allowed class with an unexpected state (a field that is not tid/shape/dtype) is refused.
    ref = _FakeReference(0)
    ref.command = "rm -rf /"
    data = pickle.dumps({"w": ref}, protocol=2)
    data = data.replace(f"{__name__}\n_FakeReference".encode(), b"torch_xla.utils.serialization\nTensorReference")
    path = tmp_path / "ref.pt"
    write_torch_zip_with_pickle(path, data)
    with pytest.raises(UnsafePickleError, match="tid/shape/dtype"):
        read_torch_file(path)


def test_tensor_reference_is_read_as_stand_in(tmp_path):
    data = pickle.dumps({"w": _FakeReference(3)}, protocol=2)
    data = data.replace(f"{__name__}\n_FakeReference".encode(), b"torch_xla.utils.serialization\nTensorReference")
    path = tmp_path / "ref.pt"
    write_torch_zip_with_pickle(path, data)
    assert read_torch_file(path) == {"w": TensorReference(3)}


class _FakeReference:
    def __init__(self, tid):
        self.tid = tid


# ---------------------------------------------------------------------------------------------------------------------
# Corrupted files


def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "ok.pt"
    torch.save({"w": torch.arange(64, dtype=torch.float32)}, path)
    return path


def test_truncated_zip(tmp_path):
    path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(path)):
        open_torch_state_dict(path)


def test_truncated_storage_member(tmp_path):
    # Rebuild the archive with the storage member 8 bytes short of the 256 its tensor needs.
    source = _saved(tmp_path)
    path = tmp_path / "short.pt"
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for info in original.infolist():
            data = original.read(info.filename)
            archive.writestr(info.filename, data[:-8] if info.filename.endswith("data/0") else data)
    with pytest.raises(CheckpointError, match=r"short\.pt.*should hold 256 bytes, found 248"):
        open_torch_state_dict(path)


def test_corrupted_local_header(tmp_path):
    path = _saved(tmp_path)
    with zipfile.ZipFile(path) as archive:
        offset = next(i.header_offset for i in archive.infolist() if i.filename.endswith("data/0"))
    data = bytearray(path.read_bytes())
    data[offset : offset + 4] = b"XXXX"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"ok\.pt.*local header"):
        open_torch_state_dict(path)


def test_corrupted_pickle_is_detected(tmp_path):
    path = _saved(tmp_path)
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("data.pkl"))
    data = bytearray(path.read_bytes())
    # torch pads the local header's extra field, so find the pickle by its protocol-2 opening bytes.
    start = data.index(b"\x80\x02}", info.header_offset)
    data[start + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=str(path)):
        open_torch_state_dict(path)


def test_file_truncated_after_opening(tmp_path):
    path = _saved(tmp_path)
    handle = open_torch_state_dict(path)["w"]
    os.truncate(path, handle.offset + 100)
    with pytest.raises(CheckpointError, match="truncated"):
        handle.load()


def test_legacy_and_foreign_files(tmp_path):
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy"):
        open_torch_state_dict(legacy)
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="zip archive"):
        open_torch_state_dict(text)


def test_not_a_state_dict(tmp_path):
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="dict"):
        open_torch_state_dict(tmp_path / "list.pt")
    torch.save({"w": torch.ones(1)}, tmp_path / "dict.pt")
    with pytest.raises(CheckpointError, match="single saved tensor"):
        open_torch_tensor(tmp_path / "dict.pt")


# ---------------------------------------------------------------------------------------------------------------------
# safetensors


def test_safetensors_matches_reference_loader(tmp_path):
    gen = torch.Generator().manual_seed(1)
    tensors = {f"t_{i}": _random((i + 1, 3), dtype, gen) for i, dtype in enumerate(DTYPES)}
    tensors["empty"] = torch.empty(0)
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    expected = load_file(path)
    lazy = open_safetensors(path)
    assert set(lazy) == set(expected)
    for name, handle in lazy.items():
        assert_bit_equal(handle.load(), expected[name])


def test_safetensors_corrupted_header(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(4)}, path)
    data = bytearray(path.read_bytes())
    data[0:8] = (10**9).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*header length"):
        open_safetensors(path)
