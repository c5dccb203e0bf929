"""``verify`` without torch (`checkpoint.byte_verify`): a full-model consolidation verified by comparing every output
byte with the rank-file bytes its piece map names. The consolidation stays in the torch-free engine and imports no
torch; a flipped bit (in a row-copied and in a column-gathered tensor), an extra, a missing or a misplaced tensor,
and a damaged header are each one error line naming the tensor and the file, and nothing is published. Adapters
(optimum-neuron's and ours, with or without the model, ``adapter=NAME``) are verified the same way, torch-free."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from optimum_neuron_peft.checkpoint import consolidate, verify
from optimum_neuron_peft.checkpoint.byte_verify import BytesVerified, verify_written
from optimum_neuron_peft.checkpoint.torch_free_plan import plan_model
from optimum_neuron_peft.cli import main
from optimum_neuron_peft.errors import CheckpointError
from optimum_neuron_peft.transformations.pieces import ColumnGather, RowCopy

from consolidation_helpers import adapter_state, model_state, write_optimum_neuron, write_optimum_neuron_adapters, write_ours
from test_optimum_neuron_adapters import Case, model_config, reference_adapter

REPO = Path(__file__).resolve().parents[2]
NO_HEAVY_IMPORTS = (
    "heavy = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules); "
    "assert not heavy, f'imported {heavy}'; "
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("byte-verify")
    model = model_state(torch.bfloat16)
    write_ours(root / "ours", 2, model=model)
    write_optimum_neuron(root / "xser", 4, 2, serialization="xser", model=model, fuse_qkv=True)
    return root


def _run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _flip(weights: Path, name: str, offset: int) -> None:
    data = bytearray(weights.read_bytes())
    header = int.from_bytes(data[:8], "little")
    entry = json.loads(data[8 : 8 + header])[name]
    data[8 + header + entry["data_offsets"][0] + offset] ^= 0x01
    weights.write_bytes(bytes(data))


def test_consolidate_verify_stays_torch_free_and_says_verified(checkpoints, tmp_path, capsys):
    result = consolidate(checkpoints / "ours", tmp_path / "lib", verify=True)
    assert (result.engine, result.reason) == ("torch-free", None)
    code, out, _ = _run_cli(capsys, "consolidate", checkpoints / "xser", tmp_path / "cli", "--verify", "--max-shard-size", "30KB")
    assert code == 0 and out.rstrip().endswith("[torch-free engine] (verified)")
    reference = consolidate(checkpoints / "xser", tmp_path / "torch", engine="torch", verify=True, max_shard_size="30KB")
    assert result.engine == "torch-free" and reference.engine == "torch"
    for file in sorted((tmp_path / "torch").iterdir()):  # same bytes as the torch engine's verified output
        assert (tmp_path / "cli" / file.name).read_bytes() == file.read_bytes(), file.name


def test_verified_consolidation_and_verify_import_no_torch(checkpoints, tmp_path):
    code = (
        "import sys; from optimum_neuron_peft.checkpoint import consolidate; "
        "r = consolidate(sys.argv[1], sys.argv[2], verify=True); " + NO_HEAVY_IMPORTS
        + "assert r.engine == 'torch-free', r.engine"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(checkpoints / "xser"), str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    code = "import sys; from optimum_neuron_peft.cli import main; c = main(sys.argv[1:]); " + NO_HEAVY_IMPORTS + "sys.exit(c)"
    for argv in (["consolidate", checkpoints / "ours", tmp_path / "cli", "--verify", "--no-progress"],
                 ["verify", checkpoints / "xser", tmp_path / "out"]):  # fmt: skip
        proc = subprocess.run([sys.executable, "-c", code, *map(str, argv)], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("all bit-exact [torch-free]")


@pytest.mark.parametrize(
    "name, kind", [("model.layers.1.self_attn.q_proj.weight", RowCopy), ("model.layers.0.self_attn.o_proj.weight", ColumnGather),
                   ("model.layers.1.mlp.down_proj.weight", ColumnGather)],  # fmt: skip
)
def test_a_flipped_bit_is_named_by_rank_file_and_tensor(checkpoints, tmp_path, capsys, name, kind):
    ckpt = checkpoints / "ours"
    consolidate(ckpt, tmp_path / "out")
    plan = plan_model(ckpt)
    tensor = next(t for t in plan.tensors if t.name == name)
    assert type(tensor.provenance) is kind  # both executions of a piece map are covered
    row = tensor.nbytes // tensor.shape[0]
    offset = row + row - 3  # row 1, last columns: rank 1's shard of a column gather, rank 0's rows of a row copy
    _flip(tmp_path / "out" / "model.safetensors", name, offset)
    rank = 1 if kind is ColumnGather else 0
    (k, _, _, _) = tensor.provenance.pieces[0]
    saved = tensor.sources[k][rank]
    expected = (
        f"{plan.checkpoint.model.rank_files[(rank, 0)]}: tensor '{saved.name}' differs from the bytes of '{name}' in "
        f"{tmp_path / 'out' / 'model.safetensors'} (first differing byte at offset "
    )
    with pytest.raises(CheckpointError) as caught:
        verify_written(plan, tmp_path / "out")
    assert str(caught.value).startswith(expected) and f"offset {offset} of the output's {tensor.nbytes})" in str(caught.value)
    code, _, err = _run_cli(capsys, "verify", ckpt, tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and expected in err


def test_a_fault_while_writing_is_caught_and_nothing_is_published(checkpoints, tmp_path, monkeypatch):
    """The check reads by its own path: a gather that writes a wrong byte (injected into the writer, not the
    checker) fails the verified consolidation, and the unverified one publishes the bad bytes."""
    from optimum_neuron_peft.checkpoint import torch_free

    real = torch_free.gather_column_bytes

    def faulty(files, provenance, sources, out, scratch):
        done = real(files, provenance, sources, out, scratch)
        out[-1, -1] ^= 0x80
        return done

    monkeypatch.setattr(torch_free, "gather_column_bytes", faulty)
    with pytest.raises(CheckpointError, match=r"o_proj.weight' differs from the bytes of 'model.layers.0.self_attn.o_proj.weight' in "):
        consolidate(checkpoints / "ours", tmp_path / "out", verify=True)
    assert not (tmp_path / "out").exists()
    assert consolidate(checkpoints / "ours", tmp_path / "unverified").engine == "torch-free"
    with pytest.raises(CheckpointError, match="differs from the bytes of"):
        verify(checkpoints / "ours", tmp_path / "unverified")


def _rewrite(weights: Path, change) -> None:
    tensors = safetensors.torch.load_file(weights)
    change(tensors)
    safetensors.torch.save_file(tensors, weights, metadata={"format": "pt"})


def test_an_extra_or_missing_tensor_is_named(checkpoints, tmp_path, capsys):
    ckpt = checkpoints / "ours"
    consolidate(ckpt, tmp_path / "extra")
    _rewrite(tmp_path / "extra" / "model.safetensors", lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    code, _, err = _run_cli(capsys, "verify", ckpt, tmp_path / "extra")
    assert code == 2 and err.count("\n") == 1
    assert f"{tmp_path / 'extra'}: holds tensors the checkpoint does not, e.g. ['model.extra.weight']" in err
    consolidate(ckpt, tmp_path / "missing")
    _rewrite(tmp_path / "missing" / "model.safetensors", lambda t: t.pop("model.norm.weight"))
    code, _, err = _run_cli(capsys, "verify", ckpt, tmp_path / "missing")
    assert code == 2 and f"{tmp_path / 'missing'}: consolidated output lacks tensor 'model.norm.weight'" in err


def test_a_bad_header_or_index_is_refused(checkpoints, tmp_path):
    ckpt = checkpoints / "xser"
    consolidate(ckpt, tmp_path / "out", max_shard_size="30KB")
    index_file = tmp_path / "out" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    files = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][name] = files[1]  # points at a shard that does not hold it
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"maps '{name}' to {files[1]}, it is in {files[0]}"):
        verify(ckpt, tmp_path / "out")
    index["weight_map"][name] = files[0]
    index_file.write_text(json.dumps(index))
    assert isinstance(verify(ckpt, tmp_path / "out"), BytesVerified)
    with open(tmp_path / "out" / files[1], "ab") as handle:
        handle.write(b"\0")  # bytes after the last tensor: the safetensors library refuses the file
    with pytest.raises(CheckpointError, match="bytes after the last tensor"):
        verify(ckpt, tmp_path / "out")


def test_verify_says_why_it_re_derives_with_torch(checkpoints, tmp_path):
    consolidate(checkpoints / "ours", tmp_path / "pt", format="pytorch")
    result = verify(checkpoints / "ours", tmp_path / "pt")
    assert result.summary().endswith("all bit-exact [torch re-derivation: the output holds no safetensors model weights]")
    consolidate(checkpoints / "ours", tmp_path / "fp32", dtype="fp32")
    assert verify(checkpoints / "ours", tmp_path / "fp32", dtype="fp32").reason == "a dtype cast (fp32)"


@pytest.fixture(scope="module")
def gqa_replicated(tmp_path_factory):
    """GQA with kv_size_multiplier=2: tp=4 ranks, each key/value head saved on two of them."""
    from optimum_neuron_peft.checkpoint.save import save_sharded_checkpoint
    from optimum_neuron_peft.checkpoint.tp_layout import plan_layout

    from consolidation_helpers import llama_config

    root = tmp_path_factory.mktemp("gqa") / "ckpt"
    config = llama_config()
    layout = plan_layout(config, 4, kv_size_multiplier=2)
    save_sharded_checkpoint(root, layout.rank_state_dicts(model_state(torch.bfloat16)), layout.metadata_per_pp(), config=config.to_dict())
    return root


def _replica_copy(tmp_path: Path, source: Path, name: str) -> tuple[Path, Path, str]:
    """A copy of ``source`` where one rank the plan does not read holds a different ``name`` (first byte flipped):
    (the copy, that rank file, the saved tensor name)."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(source, ckpt)
    plan = plan_model(ckpt)
    part = next(p for p in plan.parts if name in {t.name for t in p.tensors})
    tensor = next(t for t in part.tensors if t.name == name)
    read = {r for _, r, _, _ in tensor.provenance.pieces}
    rank = next(r for r in range(plan.source_of(part).tp_size) if r not in read)
    (k, _, _, _) = tensor.provenance.pieces[0]
    saved = tensor.sources[k][rank]
    rank_file = plan.source_of(part).rank_files[(rank, 0)]
    _flip(rank_file, saved.name, 1)
    manifest = json.loads((ckpt / "manifest.json").read_text())  # a consistent input, not a corrupted file
    manifest["files"][rank_file.relative_to(ckpt).as_posix()]["sha256"] = hashlib.sha256(rank_file.read_bytes()).hexdigest()
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    return ckpt, rank_file, saved.name


@pytest.mark.parametrize("which, name", [("ours", "model.norm.weight"), ("gqa", "model.layers.1.self_attn.k_proj.weight")])
def test_replicas_that_disagree_fail_verify_in_both_engines(checkpoints, gqa_replicated, tmp_path, capsys, which, name):
    """A replicated norm (every rank) or GQA key/value head (kv_size_multiplier=2) whose copy on a rank the
    consolidation does not read differs: torch-free and torch verification both refuse it, torch-free with one line
    naming the rank file, the saved tensor and the output tensor."""
    source = checkpoints / "ours" if which == "ours" else gqa_replicated
    ckpt, rank_file, saved = _replica_copy(tmp_path, source, name)
    expected = f"{rank_file}: tensor '{saved}' differs from the bytes of '{name}' in {tmp_path / 'out' / 'model.safetensors'}"
    with pytest.raises(CheckpointError) as caught:
        consolidate(ckpt, tmp_path / "out", verify=True)
    assert str(caught.value).startswith(expected) and "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()
    code, _, err = _run_cli(capsys, "consolidate", ckpt, tmp_path / "out", "--verify", "--no-progress")
    assert code == 2 and err.count("\n") == 1 and expected in err
    with pytest.raises(CheckpointError) as caught:  # the torch re-derivation agrees
        consolidate(ckpt, tmp_path / "torch", engine="torch", verify=True)
    assert str(caught.value).startswith(f"{rank_file}: tensor '{saved}' differs from the one re-derived from ")
    assert consolidate(ckpt, tmp_path / "out").engine == "torch-free"  # unverified: published from the read copies
    code, _, err = _run_cli(capsys, "verify", ckpt, tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and expected in err
    code, _, _ = _run_cli(capsys, "verify", source, tmp_path / "out")  # the clean checkpoint: the same output verifies
    assert code == 0


def test_a_clean_replicated_gqa_checkpoint_verifies_torch_free(gqa_replicated, tmp_path):
    result = consolidate(gqa_replicated, tmp_path / "out", verify=True)
    assert (result.engine, result.reason) == ("torch-free", None)
    code = "import sys; from optimum_neuron_peft.cli import main; c = main(sys.argv[1:]); " + NO_HEAVY_IMPORTS + "sys.exit(c)"
    proc = subprocess.run([sys.executable, "-c", code, "verify", str(gqa_replicated), str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("all bit-exact [torch-free]"), proc.stderr


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """optimum-neuron's adapter at tp=4, GQA with kv_size_multiplier=2 and a shared lora_A; ours: a model and an
    adapter (in ``default/``) at tp=2."""
    root = tmp_path_factory.mktemp("adapters")
    case = Case(tp=4, m=2)
    config = model_config(case)
    write_optimum_neuron_adapters(root / "on", config, 4, {"default": reference_adapter(config, case.targets, 0)}, kv_size_multiplier=2)
    write_ours(root / "ours", 2, model=model_state(torch.bfloat16), adapters={"default": adapter_state(seed=1)})
    return root


@pytest.mark.parametrize("which", ["on", "ours"])
def test_verified_adapters_stay_torch_free(adapters, tmp_path, which):
    code = "import sys; from optimum_neuron_peft.cli import main; c = main(sys.argv[1:]); " + NO_HEAVY_IMPORTS + "sys.exit(c)"
    for argv in (["consolidate", adapters / which, tmp_path / "out", "--verify", "--no-progress"],
                 ["verify", adapters / which, tmp_path / "out"]):  # fmt: skip
        proc = subprocess.run([sys.executable, "-c", code, *map(str, argv)], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        if argv[0] == "consolidate":
            assert proc.stdout.rstrip().endswith("[torch-free engine] (verified)"), proc.stdout
    assert proc.stdout.rstrip().endswith("all bit-exact [torch-free]")
    result = consolidate(adapters / which, tmp_path / "lib", verify=True)
    assert (result.engine, result.reason) == ("torch-free", None)
    assert result.summary().endswith("[torch-free engine]")  # the CLI adds " (verified)"
    if which == "ours":  # one adapter alone, published at the root, is verified alone
        assert consolidate(adapters / which, tmp_path / "one", adapter="default", verify=True).engine == "torch-free"
        assert isinstance(verify(adapters / which, tmp_path / "one", adapter="default"), BytesVerified)
        assert isinstance(verify(adapters / which, tmp_path / "out" / "default", adapter="default"), BytesVerified)


@pytest.mark.parametrize("which", ["on", "ours"])
@pytest.mark.parametrize(
    "name, kind", [("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight", RowCopy),
                   ("base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight", ColumnGather),
                   ("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight", ColumnGather)],  # fmt: skip
)
def test_a_flipped_bit_in_an_adapter_is_named(adapters, tmp_path, capsys, which, name, kind):
    ckpt = adapters / which
    result = consolidate(ckpt, tmp_path / "out")
    plan = plan_model(ckpt)
    part = next(p for p in plan.parts if p.adapter_name == "default")
    tensor = next(t for t in part.tensors if t.name == name)
    assert type(tensor.provenance) is kind
    (k, rank, _, _), *_ = tensor.provenance.pieces  # the first rank read: the first bytes of each output row
    offset = tensor.nbytes // tensor.shape[0] + 1  # row 1
    weights = result.directories["default"] / "adapter_model.safetensors"
    _flip(weights, name, offset)
    expected = (
        f"{plan.source_of(part).rank_files[(rank, 0)]}: tensor '{tensor.sources[k][rank].name}' differs from the bytes "
        f"of '{name}' in {weights} (first differing byte at offset "
    )
    code, out, err = _run_cli(capsys, "verify", ckpt, tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and expected in err, err
    assert f"offset {offset} of the output's {tensor.nbytes})" in err
    code, _, err = _run_cli(capsys, "verify", ckpt, result.directories["default"], "--adapter", "default")
    assert code == 2 and err.count("\n") == 1 and expected in err, err


@pytest.mark.parametrize("which", ["on", "ours"])
def test_an_extra_tensor_in_an_adapter_is_named(adapters, tmp_path, capsys, which):
    result = consolidate(adapters / which, tmp_path / "out")
    directory = result.directories["default"]
    extra = "base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"
    _rewrite(directory / "adapter_model.safetensors", lambda t: t.update({extra: torch.zeros(2)}))
    code, _, err = _run_cli(capsys, "verify", adapters / which, tmp_path / "out")
    assert code == 2 and err.count("\n") == 1
    assert f"{directory}: holds tensors the checkpoint does not, e.g. ['{extra}']" in err
    (directory / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="expected consolidated adapter weights"):
        verify(adapters / which, tmp_path / "out")


def test_adapter_replicas_that_disagree_fail_verify(adapters, tmp_path, capsys):
    """The shared q lora_A is saved on both ranks and read from rank 0: rank 1's differing copy fails verify,
    torch-free and with the torch re-derivation alike."""
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    ckpt, rank_file, saved = _replica_copy(tmp_path, adapters / "ours", name)
    weights = tmp_path / "out" / "default" / "adapter_model.safetensors"
    expected = f"{rank_file}: tensor '{saved}' differs from the bytes of '{name}' in {weights}"
    with pytest.raises(CheckpointError) as caught:
        consolidate(ckpt, tmp_path / "out", verify=True)
    assert str(caught.value).startswith(expected) and "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match=f"tensor '{saved}' differs from the one re-derived from "):
        consolidate(ckpt, tmp_path / "torch", engine="torch", verify=True)
    assert consolidate(ckpt, tmp_path / "out").engine == "torch-free"
    code, _, err = _run_cli(capsys, "verify", ckpt, tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and expected in err
