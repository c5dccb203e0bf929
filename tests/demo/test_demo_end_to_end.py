"""The README's main command, shortened: the whole pipeline must run and its checks must hold."""

import json

import torch
from safetensors.torch import load_file

from optimum_neuron_peft.cli import main
from optimum_neuron_peft.demo.run import run_demo


def test_demo_pipeline(tmp_path):
    report = run_demo(tmp_path / "demo", steps=40, tp_size=2, log=lambda m: None)
    rows = dict(report.rows)
    first, last = rows["count_up: steps, loss first -> last"].split(", ")[1].split(" -> ")
    assert float(last) < 0.5 * float(first)  # the loss visibly falls, even in 40 steps
    assert report.max_logits_diff < 1e-4  # tensor-parallel logits == vanilla PEFT with the consolidated adapter
    assert report.merged_logits_diff < 1e-4  # merged base == PEFT model
    adapter = tmp_path / "demo" / "adapters" / "count_up"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    weights = load_file(adapter / "adapter_model.safetensors")
    assert weights["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (16, 8)  # 1 kv head x 16
    assert report.plot is not None and report.plot.stat().st_size > 0
    ties = load_file(tmp_path / "demo" / "adapters" / "ties" / "adapter_model.safetensors")
    assert set(ties) == set(weights)
    assert any(not torch.equal(ties[k], weights[k]) for k in weights)


def test_demo_cli_rejects_bad_arguments(capsys):
    assert main(["demo", "--steps", "0"]) == 2
    assert "--steps must be >= 1, got 0" in capsys.readouterr().err
