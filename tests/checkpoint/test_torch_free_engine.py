"""The torch-free consolidation engine (`checkpoint.torch_free`) and the dispatch (`checkpoint.consolidate`): the same
plan and the same output bytes as the torch engine, no torch import on the CLI or library path, and the torch
engine, with the reason stated, for everything it does not take."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from optimum_neuron_peft.checkpoint.consolidate import consolidate
from optimum_neuron_peft.checkpoint.torch_engine import plan_consolidation
from optimum_neuron_peft.checkpoint.engine_common import ConsolidateOptions
from optimum_neuron_peft.checkpoint.consolidate import choose_engine
from optimum_neuron_peft.checkpoint.torch_free_plan import plan_model
from optimum_neuron_peft.formats.torch_zip import open_torch_dict, scan_torch_dict
from optimum_neuron_peft.cli import main
from optimum_neuron_peft.errors import CheckpointError, UnsafePickleError

from consolidation_helpers import adapter_state, assert_model_loads_equal, kill_mid_write_then_rerun, llama_config, write_optimum_neuron, write_ours

REPO = Path(__file__).resolve().parents[2]


def _state(dtype: torch.dtype, **overrides) -> dict[str, torch.Tensor]:
    return dict(_cached_state(dtype, **overrides))


@functools.lru_cache(maxsize=8)
def _cached_state(dtype: torch.dtype, **overrides) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(**overrides)).to(dtype)
    with torch.no_grad():  # random bits everywhere, norms included: a wrong mapping cannot pass unnoticed
        for p in model.parameters():
            p.copy_(torch.randn_like(p, dtype=torch.float32).to(dtype))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if overrides.get("tie_word_embeddings"):
        state.pop("lm_head.weight")
    return state


_xser = functools.partial(write_optimum_neuron, serialization="xser")

# (writer, tp, pp, fuse_qkv, dtype, max shard size, config overrides)
CASES = {
    "ours tp2": (write_ours, 2, 1, False, torch.bfloat16, "5GB", {}),
    "ours tp4 pp2 fused qkv, bias, kv replicated": (write_ours, 4, 2, True, torch.bfloat16, "5GB", {"attention_bias": True}),
    "ours tp8 tied, kv x4, sharded output": (write_ours, 8, 1, False, torch.bfloat16, "30KB", {"tie_word_embeddings": True}),
    "optimum-neuron tp2": (write_optimum_neuron, 2, 1, False, torch.bfloat16, "5GB", {}),
    "optimum-neuron tp4 pp2 fused qkv, bias": (write_optimum_neuron, 4, 2, True, torch.float32, "5GB", {"attention_bias": True}),
    "optimum-neuron tp8 tied, sharded output": (write_optimum_neuron, 8, 1, False, torch.bfloat16, "30KB", {"tie_word_embeddings": True}),
    "optimum-neuron tp4 MHA, 4 layers": (write_optimum_neuron, 4, 1, False, torch.bfloat16, "5GB", {"num_key_value_heads": 8, "num_hidden_layers": 4}),
    "optimum-neuron xser tp4 pp2 fused qkv": (_xser, 4, 2, True, torch.bfloat16, "30KB", {}),
}


def _write(root: Path, case: str) -> tuple[Path, dict[str, torch.Tensor]]:
    writer, tp, pp, fuse_qkv, dtype, _, overrides = CASES[case]
    model = _state(dtype, **overrides)
    writer(root, tp, pp, model=model, fuse_qkv=fuse_qkv, **overrides)
    return root, model


def _files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", list(CASES))
def test_same_bytes_as_the_torch_engine(tmp_path, capsys, case):
    ckpt, model = _write(tmp_path / "ckpt", case)
    shard_size = CASES[case][5]
    code, out, err = _run_cli(capsys, "consolidate", ckpt, tmp_path / "free", "--engine", "torch-free", "--max-shard-size", shard_size)
    assert code == 0, err
    reference = consolidate(ckpt, tmp_path / "torch", engine="torch", max_shard_size=shard_size)
    assert out.startswith(f"consolidated {reference.tensors} tensors, {reference.bytes / 1e9:.3f} GB")
    assert _files(tmp_path / "free") == _files(tmp_path / "torch")  # every file, byte for byte
    if shard_size != "5GB":
        assert (tmp_path / "free" / "model.safetensors.index.json").is_file()
    if "MHA" in case:  # and the output loads in Transformers (the byte identity covers the other cases)
        assert_model_loads_equal(tmp_path / "free", model)


@pytest.mark.parametrize("case", ["ours tp4 pp2 fused qkv, bias, kv replicated", "optimum-neuron tp8 tied, sharded output"])
def test_same_plan_as_the_torch_engine(tmp_path, case):
    ckpt, _ = _write(tmp_path / "ckpt", case)
    _, (target,) = plan_consolidation(ckpt)
    expected = [(plan.name, str(plan.dtype).removeprefix("torch."), plan.shape, group.provenance[name]) for group in target.groups for name, plan in group.outputs]
    assert [(t.name, t.dtype, t.shape, t.provenance) for t in plan_model(ckpt).tensors] == expected


def test_cli_consolidates_a_full_model_without_importing_torch(tmp_path):
    ckpt, _ = _write(tmp_path / "ckpt", "optimum-neuron tp8 tied, sharded output")
    code = (
        "import sys; from optimum_neuron_peft.cli import main; code = main(sys.argv[1:]); "
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules); "
        "assert not heavy, f'imported {heavy}'; sys.exit(code)"
    )
    argv = ["consolidate", str(ckpt), str(tmp_path / "free"), "--no-progress", "--max-shard-size", "30KB"]
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("consolidated ")
    consolidate(ckpt, tmp_path / "torch", engine="torch", max_shard_size="30KB")
    assert _files(tmp_path / "free") == _files(tmp_path / "torch")


def test_package_and_cli_import_without_torch():
    code = (
        "import sys, optimum_neuron_peft as p, optimum_neuron_peft.cli as c, optimum_neuron_peft.checkpoint.torch_free; "
        "c.build_parser('consolidate'); assert 'torch' not in sys.modules, 'torch imported'; "
        "assert set(p.__all__) <= set(dir(p)); from optimum_neuron_peft import FusedLinearsSpec, merge_utils; "
        "from optimum_neuron_peft.checkpoint import consolidate, verify, ConsolidationResult; "
        "assert callable(consolidate) and callable(verify); "
        "from optimum_neuron_peft.transformations import SPEC_REGISTRY; assert 'FusedLinearsSpec' in SPEC_REGISTRY"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_library_api_takes_the_torch_free_engine_when_it_applies(tmp_path):
    ckpt, model = _write(tmp_path / "ckpt", "ours tp2")
    result = consolidate(ckpt, tmp_path / "out")
    assert result.engine == "torch-free" and result.directories == {"model": tmp_path / "out"}
    assert_model_loads_equal(tmp_path / "out", model)


LEFT_TO_TORCH = {  # options -> the reason stated
    "dtype": ({"dtype": "fp32"}, "a dtype cast (fp32)"),
    "pytorch format": ({"format": "pytorch"}, "output format 'pytorch'"),
    "adapter selected, cast": ({"adapter": "default", "dtype": "fp16"}, "a dtype cast (fp16)"),
    "adapter in checkpoint, verify, cast": ({"with_adapter": True, "verify": True, "dtype": "bf16"}, "a dtype cast (bf16)"),
}  # adapters as saved take the torch-free engine, verified too: test_torch_free_adapters.py, test_byte_verify.py


@pytest.mark.parametrize("case", list(LEFT_TO_TORCH))
def test_what_the_torch_free_engine_leaves_to_torch(tmp_path, capsys, case):
    options, reason = LEFT_TO_TORCH[case]
    options = dict(options)
    model = _state(torch.bfloat16)
    adapters = {"default": adapter_state(seed=1)} if options.pop("with_adapter", False) or "adapter" in options else None
    write_ours(tmp_path / "ckpt", 2, model=model, adapters=adapters)
    choice = choose_engine(tmp_path / "ckpt", ConsolidateOptions(**options))
    assert (choice.engine, choice.reason, choice.plan) == ("torch", reason, None)
    result = consolidate(tmp_path / "ckpt", tmp_path / "out", **options)
    assert (result.engine, result.reason) == ("torch", reason)
    assert result.summary().endswith(f"[torch engine: {reason}]")
    with pytest.raises(CheckpointError, match="the torch-free engine cannot consolidate this checkpoint"):
        consolidate(tmp_path / "ckpt", tmp_path / "out2", engine="torch-free", **options)
    assert not (tmp_path / "out2").exists()
    argv = ["consolidate", tmp_path / "ckpt", tmp_path / "out3", "--engine", "torch-free"]
    argv += [f"--{k}" if v is True else f"--{k}={v}" for k, v in options.items()]
    code, _, err = _run_cli(capsys, *argv)
    assert code == 2 and err.count("\n") == 1
    assert err.rstrip().endswith(f"{tmp_path / 'ckpt'}: the torch-free engine cannot consolidate this checkpoint: {reason}")


def test_the_summary_names_the_engine_and_why(tmp_path, capsys):
    ckpt, _ = _write(tmp_path / "ckpt", "ours tp2")
    code, out, _ = _run_cli(capsys, "consolidate", ckpt, tmp_path / "free", "--no-progress")
    assert code == 0 and out.rstrip().endswith("[torch-free engine]")
    code, out, _ = _run_cli(capsys, "consolidate", ckpt, tmp_path / "torch", "--no-progress", "--engine", "torch")
    assert code == 0 and out.rstrip().endswith("[torch engine: asked for (engine='torch')]")
    code, out, _ = _run_cli(capsys, "consolidate", ckpt, tmp_path / "cast", "--no-progress", "--dtype", "fp32")
    assert code == 0 and out.rstrip().endswith("[torch engine: a dtype cast (fp32)]")


def test_a_bug_while_planning_is_raised_not_left_to_torch(tmp_path, monkeypatch):
    """Only `Unsupported` and `CheckpointError` are reasons to take the torch engine: any other error of the
    torch-free planner is a bug, and surfaces as such instead of silently switching engines."""
    ckpt, _ = _write(tmp_path / "ckpt", "ours tp2")

    def buggy_outputs(*args, **kwargs):
        raise KeyError("a bug in the planner")

    monkeypatch.setattr("optimum_neuron_peft.checkpoint.torch_free_plan.group_outputs", buggy_outputs)
    with pytest.raises(KeyError, match="a bug in the planner"):
        consolidate(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert consolidate(ckpt, tmp_path / "out", engine="torch").engine == "torch"  # the torch engine is not asked


def test_the_library_api_imports_no_torch_on_the_torch_free_engine(tmp_path):
    ckpt, _ = _write(tmp_path / "ckpt", "optimum-neuron tp2")
    code = (
        "import sys; from optimum_neuron_peft.checkpoint import consolidate; r = consolidate(sys.argv[1], sys.argv[2]); "
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules); "
        "assert not heavy, f'imported {heavy}'; assert r.engine == 'torch-free' and r.reason is None"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(ckpt), str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _edit_metadata(root: Path, edit) -> None:
    path = root / "shards" / "mp_metadata_pp_rank_0.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    manifest = root / "manifest.json"
    if manifest.is_file():  # keep our format's size check from firing first
        entries = json.loads(manifest.read_text())
        entries["files"]["shards/mp_metadata_pp_rank_0.json"]["size"] = path.stat().st_size
        manifest.write_text(json.dumps(entries))


def _gqa_fields(data):
    return data["model_weight_transformation_specs"][0]["specs"][0][1]


BAD_METADATA = {
    "unknown spec field": lambda d: _gqa_fields(d).update(rotary=True),
    "kv partition size": lambda d: _gqa_fields(d).update(kv_output_size_per_partition=_gqa_fields(d)["kv_output_size_per_partition"] * 2),
    "head counts": lambda d: _gqa_fields(d).update(num_attention_heads=4, q_output_size_per_partition=16),
    "no parameters": lambda d: d.pop("parameters"),
    "unclaimed tensor without entry": lambda d: d["parameters"].pop("model.norm.weight"),
    "partition dim": lambda d: d["parameters"]["lm_head.weight"].update(partition_dim=2),
}


@pytest.mark.parametrize("writer", [write_ours, write_optimum_neuron])
@pytest.mark.parametrize("case", list(BAD_METADATA))
def test_a_checkpoint_the_torch_engine_refuses_is_refused_alike(tmp_path, writer, case):
    writer(tmp_path / "ckpt", 2, model=_state(torch.bfloat16))
    _edit_metadata(tmp_path / "ckpt", BAD_METADATA[case])
    with pytest.raises(CheckpointError) as torch_error:
        consolidate(tmp_path / "ckpt", tmp_path / "out", engine="torch")
    with pytest.raises(CheckpointError) as auto_error:
        consolidate(tmp_path / "ckpt", tmp_path / "out")
    assert str(auto_error.value) == str(torch_error.value)
    assert not (tmp_path / "out").exists()


def test_scan_finds_the_tensors_open_finds_and_refuses_xser_references(tmp_path):
    base = torch.randn(6, 10)
    state = {"column_slice": base[:, 1:4], "row_slice": base[2:4], "transposed": base.t(), "bf16": torch.ones(3, 5, dtype=torch.bfloat16),
             "scalar": torch.tensor(2.5), "float8": torch.randn(5).to(torch.float8_e4m3fn), "long": torch.arange(4)}  # fmt: skip
    torch.save(state, tmp_path / "state.pt")
    scanned, opened = scan_torch_dict(tmp_path / "state.pt"), open_torch_dict(tmp_path / "state.pt")
    assert list(scanned) == list(opened)
    for name, lazy in opened.items():
        stored = scanned[name]
        assert (stored.name, stored.shape, stored.dtype, stored.file, stored.offset, stored.storage_offset) == (
            lazy.name, tuple(lazy.shape), str(lazy.dtype).removeprefix("torch."), lazy.file, lazy.offset, lazy.storage_offset
        )
        assert stored.is_dense() == lazy.is_dense() and stored.nbytes == lazy.nbytes
    write_optimum_neuron(tmp_path / "xser", 2, serialization="xser", model=_state(torch.bfloat16))
    with pytest.raises(UnsafePickleError, match="TensorReference"):
        scan_torch_dict(tmp_path / "xser" / "shards" / "model" / "dp_rank_00_tp_rank_00_pp_rank_00.pt")


def test_sigkill_during_a_torch_free_run_leaves_nothing(tmp_path):
    ckpt, _ = _write(tmp_path / "ckpt", "optimum-neuron tp2")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "optimum_neuron_peft", "consolidate", str(ckpt), str(out), "--no-progress", "--engine", "torch-free"]
    kill_mid_write_then_rerun(cmd, out, cwd=REPO)
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]
    shutil.rmtree(out)
