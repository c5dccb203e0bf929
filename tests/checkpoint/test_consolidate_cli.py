"""The consolidate / verify / reshard CLI: atomic output, SIGKILL safety, and one-line errors on bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from optimum_neuron_peft.cli import main

from consolidation_helpers import adapter_state, kill_mid_write_then_rerun, model_state, write_optimum_neuron, write_ours


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    model = model_state(torch.bfloat16)
    write_ours(root / "ours", 2, model=model, adapters={"default": adapter_state(seed=1)})
    write_optimum_neuron(root / "on", 2, 2, serialization="plain", model=model)
    write_optimum_neuron(root / "xser", 2, serialization="xser", model=model)
    return root


def tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + file.read_bytes())
    return digest.hexdigest()


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_consolidates_verifies_and_refuses_non_empty_output(checkpoints, tmp_path, capsys):
    before = tree_digest(checkpoints / "ours")
    code, out, _ = run_cli(capsys, "consolidate", checkpoints / "ours", tmp_path / "out", "--verify", "--check-checksums")
    assert code == 0 and out.startswith("consolidated 49 tensors") and out.rstrip().endswith("(verified)")
    assert tree_digest(checkpoints / "ours") == before  # the input is never modified
    code, out, _ = run_cli(capsys, "verify", checkpoints / "ours", tmp_path / "out")
    assert code == 0 and "all bit-exact" in out
    code, _, err = run_cli(capsys, "consolidate", checkpoints / "ours", tmp_path / "out")
    assert code == 2 and "output directory is not empty; pass --overwrite" in err and err.count("\n") == 1
    code, _, _ = run_cli(capsys, "consolidate", checkpoints / "on", tmp_path / "out", "--overwrite")
    assert code == 0 and not (tmp_path / "out" / "default").exists()  # replaced as a whole
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left beside it


def test_verify_reports_the_first_mismatch_by_name(checkpoints, tmp_path, capsys):
    assert run_cli(capsys, "consolidate", checkpoints / "xser", tmp_path / "out")[0] == 0
    weights = tmp_path / "out" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    header = int.from_bytes(data[:8], "little")
    entry = json.loads(data[8 : 8 + header])["model.layers.1.mlp.up_proj.weight"]
    data[8 + header + entry["data_offsets"][0] + 5] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "verify", checkpoints / "xser", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1
    assert "dp_rank_00_tp_rank_00_pp_rank_00.pt: tensor 'model.layers.1.mlp.gate_up_proj.weight' differs" in err


def test_sigkill_leaves_nothing_and_a_rerun_succeeds(checkpoints, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "optimum_neuron_peft", "consolidate", str(checkpoints / "ours"), str(out), "--no-progress"]
    kill_mid_write_then_rerun(cmd, out)
    assert (out / "model.safetensors").is_file() and (out / "default" / "adapter_model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the killed run's temporary was cleaned up


# -- bad input: each gives exit 2, one stderr line naming the file, and no output ---------------------------------


def _rank(root: Path, tp: int = 1) -> Path:
    return root / "shards" / "model" / f"dp_rank_00_tp_rank_{tp:02d}_pp_rank_00.pt"


def _ours_rank(root: Path, tp: int = 1) -> Path:
    return root / "shards" / "model" / f"tp_rank_{tp:02d}_pp_rank_00.safetensors"


def _edit_metadata(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {EVIL_MARK}",))


EVIL_MARK = Path("/tmp/optimum_neuron_peft_evil_marker")


def _evil_pickle(path: Path) -> None:
    torch.save({"model.norm.weight": Evil()}, path)


BAD_INPUTS = {
    "missing rank file (ours)": ("ours", lambda r: _ours_rank(r).unlink(), "tp_rank_01_pp_rank_00.safetensors"),
    "missing rank file (optimum-neuron)": ("xser", lambda r: _rank(r, 0).unlink(), "dp_rank_00_tp_rank_00_pp_rank_00.pt"),
    "ranks with different keys": (
        "xser", lambda r: shutil.rmtree(Path(f"{_rank(r)}.tensors")) or torch.save({"model.norm.weight": torch.zeros(64)}, _rank(r)),
        "dp_rank_00_tp_rank_01_pp_rank_00.pt",
    ),
    "ranks with different shapes": (
        "on", lambda r: torch.save({k: (v[:-1] if "embed" in k else v) for k, v in torch.load(_rank(r), weights_only=True).items()}, _rank(r)),
        "dp_rank_00_tp_rank_01_pp_rank_00.pt",
    ),
    "metadata tp size disagrees": (
        "xser", lambda r: _edit_metadata(r / "shards" / "mp_metadata_pp_rank_0.json", lambda d: d["parameters"]["lm_head.weight"].update(num_partitions=4)),
        "mp_metadata_pp_rank_0.json",
    ),
    "metadata shapes disagree": (
        "xser", lambda r: _edit_metadata(r / "shards" / "mp_metadata_pp_rank_0.json", lambda d: d["model_weight_transformation_specs"][0]["specs"][0][1].update(q_output_size_per_partition=64, num_attention_heads=4, num_key_value_heads=1, kv_size_multiplier=2, kv_output_size_per_partition=32)),
        "dp_rank_00_tp_rank_00_pp_rank_00.pt",
    ),
    "truncated safetensors": ("ours", lambda r: os.truncate(_ours_rank(r), 1000), "tp_rank_01_pp_rank_00.safetensors"),
    "truncated .pt": ("xser", lambda r: os.truncate(_rank(r), 100), "dp_rank_00_tp_rank_01_pp_rank_00.pt"),
    "corrupted safetensors header": (
        "ours", lambda r: _ours_rank(r).write_bytes(b"\xff" * 16 + _ours_rank(r).read_bytes()[16:]), "tp_rank_01_pp_rank_00.safetensors",
    ),
    "unknown spec class": (
        "ours", lambda r: _edit_metadata(r / "shards" / "mp_metadata_pp_rank_0.json", lambda d: d["model_weight_transformation_specs"][0]["specs"][0].__setitem__(0, "os.system")),
        "mp_metadata_pp_rank_0.json",
    ),
    "pickle running code": ("on", lambda r: _evil_pickle(_rank(r)), "dp_rank_00_tp_rank_01_pp_rank_00.pt"),
    "empty directory": ("empty", lambda r: None, "empty"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_naming_the_file(checkpoints, tmp_path, capsys, case):
    source, corrupt, named = BAD_INPUTS[case]
    ckpt = tmp_path / "empty"
    if source == "empty":
        ckpt.mkdir()
    else:
        ckpt = tmp_path / source
        shutil.copytree(checkpoints / source, ckpt)
    corrupt(ckpt)
    if case == "unknown spec class":  # keep the manifest's size check from firing first
        manifest = json.loads((ckpt / "manifest.json").read_text())
        manifest["files"]["shards/mp_metadata_pp_rank_0.json"]["size"] = (ckpt / "shards/mp_metadata_pp_rank_0.json").stat().st_size
        (ckpt / "manifest.json").write_text(json.dumps(manifest))
    EVIL_MARK.unlink(missing_ok=True)
    code, out, err = run_cli(capsys, "consolidate", ckpt, tmp_path / "out")
    assert code == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert named in err, err
    assert not (tmp_path / "out").exists()
    assert not EVIL_MARK.exists()


def test_checksums_catch_same_size_corruption(checkpoints, tmp_path, capsys):
    ckpt = tmp_path / "ours"
    shutil.copytree(checkpoints / "ours", ckpt)
    path = _ours_rank(ckpt)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "consolidate", ckpt, tmp_path / "out", "--check-checksums")
    assert code == 2 and "tp_rank_01_pp_rank_00.safetensors: sha256 differs from the manifest" in err
    assert not (tmp_path / "out").exists()


def test_reshard_cli_round_trip_is_bit_exact(checkpoints, tmp_path, capsys):
    from safetensors.torch import load_file

    assert run_cli(capsys, "reshard", checkpoints / "on", tmp_path / "tp4", "--tp-size", "4")[0] == 0
    assert run_cli(capsys, "reshard", tmp_path / "tp4", tmp_path / "tp2", "--tp-size", "2")[0] == 0
    assert run_cli(capsys, "reshard", checkpoints / "ours", tmp_path / "ours2", "--tp-size", "2")[0] == 0
    for rank_file in sorted((checkpoints / "ours" / "shards" / "model").iterdir()):
        a, b = load_file(rank_file), load_file(tmp_path / "ours2" / "shards" / "model" / rank_file.name)
        assert list(a) == list(b) and all(torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in a)
    assert run_cli(capsys, "consolidate", tmp_path / "tp2", tmp_path / "out")[0] == 0
    assert run_cli(capsys, "verify", checkpoints / "on", tmp_path / "out")[0] == 0
    code, _, err = run_cli(capsys, "reshard", checkpoints / "on", tmp_path / "bad", "--tp-size", "3")
    assert code == 2 and err.count("\n") == 1 and not (tmp_path / "bad").exists()
