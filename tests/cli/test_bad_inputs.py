"""Hostile input and faults against every command, one row per case: each must exit non-zero with exactly one
``error:`` line on stderr naming the cause, write nothing anywhere (no file outside OUTPUT_DIR, and no OUTPUT_DIR),
and leave every input byte for byte as it was."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from optimum_neuron_peft.cli import main

from bad_input_workspace import build_workspace, edit_json, refresh_manifest, rewrite_safetensors_header, snapshot

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("pristine") / "ws")


@dataclass
class Case:
    id: str
    setup: Callable[[Path], list[str]]  # corrupts the workspace copy, returns the command line
    code: int
    message: str  # expected in the error line
    in_subprocess: bool = False
    env: dict | None = None


# --- 1. names from inputs never become paths outside OUTPUT_DIR


def _on_adapter_renamed(ws: Path, name: str) -> None:
    (ws / "on" / "adapter_default").rename(ws / "on" / f"adapter_{name}")


def consolidate_on_dotdot(ws):
    _on_adapter_renamed(ws, "..")
    return ["consolidate", ws / "on", ws / "W" / "out"]


def reshard_on_dotdot(ws):
    _on_adapter_renamed(ws, "..")
    return ["reshard", ws / "on", ws / "W" / "out", "--tp-size", "1"]


def consolidate_ours_manifest_escape(ws):
    edit_json(ws / "ours" / "manifest.json", lambda m: m.update(adapters=["../../evil"]))
    return ["consolidate", ws / "ours", ws / "W" / "out"]


def consolidate_ours_manifest_absolute_file(ws):
    edit_json(ws / "ours" / "manifest.json", lambda m: m["files"].update({"/etc/passwd": {"size": 1, "sha256": "0" * 64}}))
    return ["consolidate", ws / "ours", ws / "out"]


def merge_index_escape(ws):
    base = ws / "base"
    (base / "model.safetensors").rename(base / "shard.safetensors")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "../base/shard.safetensors"}}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    return ["merge", "into-base", base, ws / "a1", "-o", ws / "out"]


# --- 2. commands never delete or replace their inputs


def merge_into_base_output_contains_inputs(ws):
    return ["merge", "into-base", ws / "base", ws / "a1", "-o", ws, "--overwrite"]


def merge_into_base_output_is_input(ws):
    return ["merge", "into-base", ws / "base", ws / "a1", "-o", ws / "base", "--overwrite"]


def combine_output_is_input(ws):
    return ["merge", "combine", ws / "a1", ws / "a2", "--weights", "1", "1", "--combination-type", "cat", "-o", ws / "a1", "--overwrite"]


def reshard_output_inside_input(ws):
    return ["reshard", ws / "ours", ws / "ours" / "out", "--tp-size", "1", "--overwrite"]


def demo_non_empty_output(ws):
    return ["demo", "--output-dir", ws / "base", "--steps", "1"]


def consolidate_non_empty_output(ws):
    return ["consolidate", ws / "ours", ws / "a1"]


# --- 3. one run per output


def consolidate_locked_output(ws):
    out = ws / "out"
    code = (
        "import sys, time; from optimum_neuron_peft.utils.atomic import output_lock\n"
        f"with output_lock({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline().strip() == b"locked"
    _HOLDERS.append(holder)
    return ["consolidate", ws / "ours", out]


_HOLDERS: list[subprocess.Popen] = []


# --- 4. wrong results are refused, not published


def combine_nan_weight(ws):
    return ["merge", "combine", ws / "a1", ws / "a2", "--weights", "nan", "1", "--combination-type", "linear", "-o", ws / "out"]


def combine_inf_weight(ws):
    return ["merge", "combine", ws / "a1", ws / "a2", "--weights", "inf", "1", "--combination-type", "cat", "-o", ws / "out"]


def combine_huge_weight_svd(ws):
    return ["merge", "combine", ws / "a1", ws / "a2", "--weights", "1e308", "1e308", "--combination-type", "svd", "-o", ws / "out"]


def combine_huge_weight_linear(ws):
    return ["merge", "combine", ws / "a1", ws / "a2", "--weights", "1e308", "1e308", "--combination-type", "linear", "-o", ws / "out"]


def combine_nan_density(ws):
    return ["merge", "combine", ws / "a1", ws / "a2", "--weights", "1", "1", "--combination-type", "ties", "--density", "nan", "-o", ws / "out"]


def combine_svd_rank_too_large(ws):
    return ["merge", "combine", ws / "a1", ws / "a2", "--weights", "1", "1", "--combination-type", "svd", "--svd-rank", "100000", "-o", ws / "out"]


def merge_truncated_base(ws):
    path = ws / "base" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-4096])
    return ["merge", "into-base", ws / "base", ws / "a1", "-o", ws / "out"]


def merge_overlapping_offsets(ws):
    def overlap(header):
        names = [n for n in header if n != "__metadata__"]
        a, b = sorted(names, key=lambda n: header[n]["data_offsets"][0])[:2]
        if header[a]["data_offsets"][1] - header[a]["data_offsets"][0] == header[b]["data_offsets"][1] - header[b]["data_offsets"][0]:
            header[b]["data_offsets"] = list(header[a]["data_offsets"])
        else:
            header[b]["data_offsets"] = [header[a]["data_offsets"][0], header[a]["data_offsets"][0] + header[b]["data_offsets"][1] - header[b]["data_offsets"][0]]

    rewrite_safetensors_header(ws / "base" / "model.safetensors", overlap)
    return ["merge", "into-base", ws / "base", ws / "a1", "-o", ws / "out"]


def consolidate_fractional_offsets(ws):
    rank_file = ws / "ours" / "shards" / "model" / "tp_rank_00_pp_rank_00.safetensors"

    def fractional(header):
        name = next(n for n in header if n != "__metadata__")
        header[name]["data_offsets"] = [float(x) + (0.5 if i else 0.0) for i, x in enumerate(header[name]["data_offsets"])]

    rewrite_safetensors_header(rank_file, fractional)
    refresh_manifest(ws / "ours")
    return ["consolidate", ws / "ours", ws / "out"]


def _on_metadata(ws: Path, edit) -> None:
    edit_json(ws / "on" / "shards" / "mp_metadata_pp_rank_0.json", edit)


def _first_sharded(meta):
    return next(e for e in meta["parameters"].values() if e["tensor_model_parallel"])


def metadata_string_false(ws):
    _on_metadata(ws, lambda m: next(iter(m["parameters"].values())).update(tensor_model_parallel="false"))
    return ["consolidate", ws / "on", ws / "out"]


def metadata_fractional_partitions(ws):
    _on_metadata(ws, lambda m: _first_sharded(m).update(num_partitions=2.5))
    return ["consolidate", ws / "on", ws / "out"]


def metadata_integer_module_name(ws):
    _on_metadata(ws, lambda m: m["model_weight_transformation_specs"][0].update(module_fully_qualified_name=7))
    return ["consolidate", ws / "on", ws / "out"]


def metadata_spec_field_wrong_type(ws):
    _on_metadata(ws, lambda m: m["model_weight_transformation_specs"][0]["specs"][0][1].update(tp_size="2"))
    return ["consolidate", ws / "on", ws / "out"]


def config_disagrees_with_original_dims(ws):
    # The metadata's FusedLinearsSpec says original_dims [96, 96] (and the rank files agree); config.json says 48.
    edit_json(ws / "on" / "config.json", lambda c: c.update(intermediate_size=48))
    return ["consolidate", ws / "on", ws / "out"]


def manifest_fractional_tp_size(ws):
    edit_json(ws / "ours" / "manifest.json", lambda m: m.update(tp_size=2.5))
    return ["consolidate", ws / "ours", ws / "out"]


def verify_extra_tensor(ws):
    assert main(["consolidate", str(ws / "ours"), str(ws / "cons"), "--adapter", "default"]) == 0
    from safetensors.torch import load_file, save_file

    path = ws / "cons" / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.extra.lora_A.weight"] = torch.zeros(2, 2)
    save_file(tensors, path, metadata={"format": "pt"})
    return ["verify", ws / "ours", ws / "cons", "--adapter", "default"]


def verify_null_checksum(ws):
    def null(m):
        rel = next(r for r in m["files"] if r.endswith(".safetensors"))
        m["files"][rel]["sha256"] = None

    edit_json(ws / "ours" / "manifest.json", null)
    return ["verify", ws / "ours", ws / "ours-never-consolidated"]


def compressed_pickle_bomb(ws):
    rank_file = ws / "on" / "shards" / "model" / "dp_rank_00_tp_rank_00_pp_rank_00.pt"
    with zipfile.ZipFile(rank_file) as src:
        members = [(info, src.read(info)) for info in src.infolist()]
    with zipfile.ZipFile(rank_file, "w") as dst:
        for info, data in members:
            if info.filename.endswith("/data.pkl"):  # the pickle stops at STOP: what follows is never parsed
                dst.writestr(info.filename, data + bytes(200 << 20), compress_type=zipfile.ZIP_DEFLATED)
            else:
                dst.writestr(info, data)
    return ["consolidate", ws / "on", ws / "out"]


# --- 5. faults: one line, no traceback


def dangling_symlink_output(ws):
    (ws / "out").symlink_to(ws / "missing-target")
    return ["consolidate", ws / "ours", ws / "out"]


def deep_json_adapter_config(ws):
    (ws / "a1" / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    return ["merge", "combine", ws / "a1", ws / "a2", "--weights", "1", "1", "-o", ws / "out"]


def deep_json_metadata(ws):
    (ws / "on" / "shards" / "mp_metadata_pp_rank_0.json").write_text('{"parameters": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return ["consolidate", ws / "on", ws / "out"]


def huge_max_shard_size(ws):
    return ["consolidate", ws / "ours", ws / "out", "--max-shard-size", "1e400GB"]


def reshard_bad_config(ws):
    edit_json(ws / "base" / "config.json", lambda c: c.update(hidden_size="32"))
    return ["reshard", ws / "base", ws / "out", "--tp-size", "2"]


def reshard_bad_index(ws):
    base = ws / "base"
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": 5}}))
    return ["reshard", base, ws / "out", "--tp-size", "2"]


def adapter_config_string_rank(ws):
    edit_json(ws / "a1" / "adapter_config.json", lambda c: c.update(r="4"))
    return ["merge", "combine", ws / "a1", ws / "a2", "--weights", "1", "1", "-o", ws / "out"]


def reshard_adapter_config_wrong_type(ws):
    edit_json(ws / "on" / "adapter_default" / "adapter_config.json", lambda c: c.update(lora_alpha="8"))
    return ["reshard", ws / "on", ws / "out", "--tp-size", "1"]


def adapter_config_string_flag(ws):
    edit_json(ws / "a1" / "adapter_config.json", lambda c: c.update(use_rslora="false"))
    return ["merge", "into-base", ws / "base", ws / "a1", "-o", ws / "out"]


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PAYLOAD_RAN",))


def malicious_adapter_bin(ws):
    (ws / "a1" / "adapter_model.safetensors").unlink()
    torch.save({"x": _Payload()}, ws / "a1" / "adapter_model.bin")
    return ["merge", "combine", ws / "a1", ws / "a2", "--weights", "1", "1", "-o", ws / "out"]


def _fault(err: int):
    def setup(ws):
        return ["consolidate", ws / "ours", ws / "out", "--engine", "torch"]

    setup.errno = err
    return setup


def efbig_file_size_limit(ws):
    return ["consolidate", ws / "ours", ws / "out"]


CASES = [
    Case("consolidate-adapter-dotdot", consolidate_on_dotdot, 2, "adapter name '..' is not a safe file name"),
    Case("reshard-adapter-dotdot", reshard_on_dotdot, 2, "adapter name '..' is not a safe file name"),
    Case("manifest-adapter-escape", consolidate_ours_manifest_escape, 2, "'../../evil' is not a safe file name"),
    Case("manifest-absolute-file", consolidate_ours_manifest_absolute_file, 2, "'/etc/passwd' is not a safe relative path"),
    Case("index-shard-escape", merge_index_escape, 2, "shard file name '../base/shard.safetensors' is not a safe"),
    Case("into-base-output-contains-inputs", merge_into_base_output_contains_inputs, 2, "must not be, contain or be inside the input"),
    Case("into-base-output-is-input", merge_into_base_output_is_input, 2, "must not be, contain or be inside the input"),
    Case("combine-output-is-input", combine_output_is_input, 2, "must not be, contain or be inside the input"),
    Case("reshard-output-inside-input", reshard_output_inside_input, 2, "must not be, contain or be inside the input"),
    Case("demo-non-empty-output", demo_non_empty_output, 2, "output directory is not empty; pass --overwrite"),
    Case("consolidate-non-empty-output", consolidate_non_empty_output, 2, "output directory is not empty; pass --overwrite"),
    Case("locked-output", consolidate_locked_output, 2, "another run (pid "),
    Case("combine-nan-weight", combine_nan_weight, 2, "weights: expected finite numbers, found nan"),
    Case("combine-inf-weight", combine_inf_weight, 2, "weights: expected finite numbers, found inf"),
    Case("combine-1e308-svd", combine_huge_weight_svd, 2, "module 'base_model.model.model.layers.0.self_attn.q_proj'"),
    Case("combine-1e308-linear", combine_huge_weight_linear, 2, "the combined adapter is not finite"),
    Case("combine-nan-density", combine_nan_density, 2, "density: expected a number in [0, 1], found nan"),
    Case("combine-svd-rank-100000", combine_svd_rank_too_large, 2, "svd_rank: expected at most 16"),
    Case("into-base-truncated-base", merge_truncated_base, 2, "model.safetensors: tensor"),
    Case("into-base-overlapping-offsets", merge_overlapping_offsets, 2, "expected it to start at"),
    Case("consolidate-fractional-offsets", consolidate_fractional_offsets, 2, "tp_rank_00_pp_rank_00.safetensors"),
    Case("metadata-string-false", metadata_string_false, 2, "tensor_model_parallel': expected a boolean (true/false), found string 'false'"),
    Case("metadata-tp-2.5", metadata_fractional_partitions, 2, "num_partitions': expected an integer >= 1 and <= 65536, found number 2.5"),
    Case("metadata-int-module-name", metadata_integer_module_name, 2, "module_fully_qualified_name': expected a string, found integer 7"),
    Case("metadata-spec-field-type", metadata_spec_field_wrong_type, 2, "tp_size': expected an integer >= 1 and <= 65536, found string '2'"),
    Case("config-vs-original-dims", config_disagrees_with_original_dims, 2, "config.json: tensor 'model.layers.0.mlp.gate_proj.weight' is produced with shape (96, 64), but config.json gives dimension 0 the size 48"),
    Case("manifest-tp-2.5", manifest_fractional_tp_size, 2, "manifest.json: field 'tp_size': expected an integer >= 1"),
    Case("verify-extra-tensor", verify_extra_tensor, 2, "holds tensors the checkpoint does not, e.g. ['base_model.model.extra.lora_A.weight']"),
    Case("verify-null-checksum", verify_null_checksum, 2, "sha256': expected a sha256 (64 hex digits), found null"),
    Case("compressed-pickle-bomb", compressed_pickle_bomb, 2, "expected at most 67108864"),
    Case("dangling-symlink-output", dangling_symlink_output, 2, "is a symbolic link to"),
    Case("deep-json-adapter-config", deep_json_adapter_config, 2, "adapter_config.json: expected JSON nested at most 32 deep"),
    Case("deep-json-metadata", deep_json_metadata, 2, "mp_metadata_pp_rank_0.json: expected JSON nested at most 32 deep"),
    Case("max-shard-size-1e400GB", huge_max_shard_size, 2, "max shard size '1e400GB' is not a size"),
    Case("reshard-bad-config", reshard_bad_config, 2, "config.json: field 'hidden_size': expected an integer >= 1, found string '32'"),
    Case("reshard-bad-index", reshard_bad_index, 2, "weight_map.lm_head.weight': expected a string, found integer 5"),
    Case("adapter-config-string-r", adapter_config_string_rank, 2, "adapter_config.json: field 'r': expected an integer"),
    Case("reshard-adapter-config-type", reshard_adapter_config_wrong_type, 2, "lora_alpha': expected a finite number, found string '8'"),
    Case("adapter-config-string-flag", adapter_config_string_flag, 2, "use_rslora': expected a boolean (true/false), found string 'false'"),
    Case("malicious-adapter-bin", malicious_adapter_bin, 2, "adapter_model.bin: cannot be read safely with weights_only=True"),
    Case("enospc", _fault(errno.ENOSPC), 1, "model.safetensors: No space left on device (ENOSPC)"),
    Case("erofs", _fault(errno.EROFS), 1, "model.safetensors: Read-only file system (EROFS)"),
    Case("eacces", _fault(errno.EACCES), 1, "model.safetensors: Permission denied (EACCES)"),
    Case("efbig-ulimit", efbig_file_size_limit, 1, "model.safetensors: File too large (EFBIG)", in_subprocess=True),
]

_EFBIG_RUNNER = (
    "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000)); "
    "from optimum_neuron_peft.cli import main; sys.exit(main(sys.argv[1:]))"
)


def _run(case: Case, argv: list[str], capsys, monkeypatch, cwd: Path) -> tuple[int, str]:
    if case.in_subprocess:
        proc = subprocess.run([sys.executable, "-c", _EFBIG_RUNNER, *argv], capture_output=True, text=True, cwd=cwd,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)  # fmt: skip
        return proc.returncode, proc.stderr
    err_no = getattr(case.setup, "errno", None)
    if err_no is not None:  # a fault of the file system while writing the output, injected at the write call

        def failing_pwrite(fd, data, offset):
            raise OSError(err_no, os.strerror(err_no))

        monkeypatch.setattr(os, "pwrite", failing_pwrite)
    monkeypatch.chdir(cwd)
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_in_one_line_and_nothing_changes(case, pristine, tmp_path, capsys, monkeypatch):
    ws = tmp_path / "ws"
    shutil.copytree(pristine, ws, symlinks=True)
    argv = [str(a) for a in case.setup(ws)]
    capsys.readouterr()
    before = snapshot(tmp_path)
    try:
        code, err = _run(case, argv, capsys, monkeypatch, tmp_path)
    finally:
        monkeypatch.undo()
        while _HOLDERS:
            holder = _HOLDERS.pop()
            holder.kill()
            holder.wait()
    lines = err.splitlines()
    assert code == case.code, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert case.message in lines[0], lines[0]
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before  # nothing written anywhere (no OUTPUT_DIR either), every input unchanged
    assert not (tmp_path / "PAYLOAD_RAN").exists()
