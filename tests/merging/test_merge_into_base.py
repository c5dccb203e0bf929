"""merge_adapter_into_base against PEFT's merge_and_unload, and the merge CLI."""

import json
import subprocess
import sys

import pytest
import torch
from merging_tiny_models import save_adapter, save_base
from peft import PeftModel
from transformers import AutoModelForCausalLM

from optimum_neuron_peft.cli import main
from optimum_neuron_peft.errors import MergeError
from optimum_neuron_peft.merging import merge_adapter_into_base
from optimum_neuron_peft.merging.device import resolve_device

EXACT = dict(rtol=0, atol=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("into_base")
    save_base(root / "base32")
    save_base(root / "base_sharded", max_shard_size="20KB")
    save_base(root / "base16", dtype=torch.bfloat16)
    adapter = save_adapter(root / "base32", root / "adapter", seed=5,
                           targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    rslora = save_adapter(root / "base32", root / "rslora", seed=6, r=8, alpha=4, use_rslora=True,
                          dtype=torch.bfloat16)
    return root, adapter, rslora


def _reference(base, adapter, dtype):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


@pytest.mark.parametrize("base,adapter_name,dtype", [
    ("base32", "adapter", torch.float32), ("base_sharded", "adapter", torch.float32),
    ("base16", "adapter", torch.bfloat16), ("base32", "rslora", torch.float32),
])
def test_matches_merge_and_unload(models, tmp_path, base, adapter_name, dtype):
    root = models[0]
    out = merge_adapter_into_base(root / base, root / adapter_name, tmp_path / "merged")
    want = _reference(root / base, root / adapter_name, dtype)
    got = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).state_dict()
    assert set(got) == set(want)
    changed = 0
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, **EXACT)
        changed += not torch.equal(tensor, AutoModelForCausalLM.from_pretrained(root / base, dtype=dtype)
                                   .state_dict()[name]) if name.endswith("q_proj.weight") else 0
    assert changed == 2  # the merge did change the targets
    in_files = sorted(p.name for p in (root / base).iterdir())
    assert sorted(p.name for p in out.iterdir()) == in_files  # same shards, index and config files


def test_missing_target_and_bin_only_base(models, tmp_path):
    root, adapter, _ = models
    config = json.loads((adapter / "adapter_config.json").read_text())
    bad = tmp_path / "bad_adapter"
    bad.mkdir()
    from safetensors.torch import load_file, save_file
    tensors = {k.replace("layers.1.", "layers.7."): v for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    save_file(tensors, bad / "adapter_model.safetensors")
    (bad / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    with pytest.raises(MergeError, match=r"layers\.7.*base has no tensor"):
        merge_adapter_into_base(root / "base32", bad, out)
    not_a_model = tmp_path / "not_a_model"  # the output may not be inside an input: a directory of its own
    not_a_model.mkdir()
    with pytest.raises(MergeError, match="config.json"):
        merge_adapter_into_base(not_a_model, adapter, out)
    assert not out.exists()


def test_devices_fail_clearly():
    with pytest.raises(MergeError, match="torch_xla is not installed.*available devices: cpu"):
        resolve_device("xla")
    if not torch.cuda.is_available():
        with pytest.raises(MergeError, match="--device cuda: CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(MergeError, match="expected cpu"):
        resolve_device("tpu")


def test_cli_combine_and_into_base(models, tmp_path, capsys):
    root, adapter, rslora = models
    combined = tmp_path / "combined"
    rc = main(["merge", "combine", str(adapter), str(root / "adapter"), "--weights", "0.5", "0.5",
               "--combination-type", "ties", "--density", "0.5", "-o", str(combined), "--no-progress"])
    assert rc == 0 and (combined / "adapter_model.safetensors").is_file()
    merged = tmp_path / "merged"
    assert main(["merge", "into-base", str(root / "base32"), str(combined), "-o", str(merged), "--no-progress"]) == 0
    assert (merged / "model.safetensors").is_file()


@pytest.mark.parametrize("argv,message", [
    (["combine", "{adapter}", "{rslora}", "--weights", "1", "1", "--combination-type", "ties", "--density", "0.5"],
     "equal rank"),
    (["combine", "{adapter}", "{adapter}", "--weights", "1", "--combination-type", "cat"], "weights"),
    (["combine", "{adapter}", "{adapter}", "--weights", "1", "1", "--combination-type", "dare_ties"], "density"),
    (["into-base", "{base}", "{missing}"], "adapter_config.json"),
    (["into-base", "{base}", "{adapter}", "--device", "xla"], "torch_xla"),
])
def test_cli_errors_exit_2_and_write_nothing(models, tmp_path, capsys, argv, message):
    root, adapter, rslora = models
    out = tmp_path / "out"
    values = dict(adapter=adapter, rslora=rslora, base=root / "base32", missing=tmp_path / "nope")
    argv = ["merge", *[a.format(**values) for a in argv], "-o", str(out), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_cli_entry_point_progress_bar(models, tmp_path):
    root, adapter, _ = models
    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "optimum_neuron_peft", "merge", "into-base", str(root / "base32"),
                           str(adapter), "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "14/14" in proc.stderr  # 2 layers x 7 targets
